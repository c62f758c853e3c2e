"""Quantized form: frozen QuantizedTensor linears + a separate LoRA pytree, jitted apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.lora import LoraConfig, init_lora, merge_lora
from apiq_jax.models import (
    LlamaForCausalLM,
    ModelConfig,
    apply,
    block_forward,
    dequantize_params,
    embed,
    forward,
    init_params,
    load_pretrained,
    quantize_model,
    quantize_params,
    quantized_linear_names,
)
from apiq_jax.quant import ClipLogits, QuantConfig, QuantizedTensor, init_clip, quantize
from tests.conftest import require_shared

# MLP width 172 (like stories260K) is not a multiple of the group size 64: padded last group.
CFG = ModelConfig("LlamaForCausalLM", 96, 64, 172, 2, 4, 2, 16, tie_word_embeddings=False)
QCFG = QuantConfig(bits=2, group_size=64)
LCFG = LoraConfig(rank=8, alpha=16)
_forward_jit = jax.jit(forward, static_argnames="config")


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0), std=0.1)
    frozen, lora = quantize_model(params, QCFG, LCFG, key=jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    return params, frozen, lora, ids


def _nonzero_b(lora, seed=2):
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    return lora.replace({
        "layers": [
            {n: {"a": ab["a"], "b": 0.05 * jax.random.normal(next(keys), ab["b"].shape)} for n, ab in layer.items()}
            for layer in lora["layers"]
        ]
    })


def test_frozen_holds_integer_codes_and_untouched_dense_leaves(setup):
    params, frozen, lora, _ = setup
    names = quantized_linear_names(frozen)
    assert len(names) == 7 * CFG.num_hidden_layers
    for layer in frozen["layers"]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            qt = layer[name]
            assert isinstance(qt, QuantizedTensor)
            assert qt.codes.dtype == jnp.uint32
            assert qt.bits == 2 and qt.group_size == 64
        assert layer["input_layernorm"] is not None
    # gate/up: in = 64 -> 1 group; down: in = 172 -> 3 groups, the last one padded
    assert frozen["layers"][0]["down_proj"].n_groups == 3
    assert frozen["layers"][0]["down_proj"].codes.shape == (64, 3 * 64 * 2 // 32)
    for key in ("embed_tokens", "norm", "lm_head"):
        assert frozen[key] is params[key]
    assert frozen["layers"][0]["input_layernorm"] is params["layers"][0]["input_layernorm"]
    assert lora["layers"][0]["down_proj"]["a"].shape == (172, 8)
    assert lora["layers"][0]["down_proj"]["b"].shape == (8, 64)


def test_b_zero_equals_dequantized_dense_model(setup):
    params, frozen, lora, ids = setup
    q = apply(frozen, lora, ids, CFG)
    dense = _forward_jit(dequantize_params(frozen), None, ids, CFG)
    np.testing.assert_allclose(np.asarray(q), np.asarray(dense), atol=1e-5)
    full = _forward_jit(params, None, ids, CFG)
    assert np.abs(np.asarray(q) - np.asarray(full)).max() > 1e-2  # 2-bit rounding is visible


def test_nonzero_lora_equals_merged_dense_weights(setup):
    _, frozen, lora, ids = setup
    lora = _nonzero_b(lora)
    q = apply(frozen, lora, ids, CFG)
    merged = _forward_jit(merge_lora(frozen, lora), None, ids, CFG)
    np.testing.assert_allclose(np.asarray(q), np.asarray(merged), atol=1e-4)
    without = apply(frozen, None, ids, CFG)
    assert np.abs(np.asarray(q) - np.asarray(without)).max() > 1e-3


def _loss(frozen, lora, ids):
    logits = apply(frozen, lora, ids, CFG)
    return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])


def test_gradients_flow_to_lora_only(setup):
    _, frozen, lora, ids = setup
    grads = jax.grad(_loss, argnums=1)(frozen, lora, ids)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    g = grads["layers"][0]["q_proj"]
    # with b = 0 the gradient reaches b (a is random), not yet a
    assert float(jnp.abs(g["b"]).max()) > 0
    assert float(jnp.abs(g["a"]).max()) == 0
    grads2 = jax.grad(_loss, argnums=1)(frozen, _nonzero_b(lora), ids)
    assert float(jnp.abs(grads2["layers"][1]["down_proj"]["a"]).max()) > 0


def test_frozen_is_never_differentiated(setup):
    _, frozen, lora, ids = setup
    # the quantized linears hold integer codes: JAX refuses to differentiate them
    with pytest.raises(TypeError, match="(?i)int|float"):
        jax.grad(_loss, argnums=0)(frozen, lora, ids)
    # and apply stops gradients at the float leaves (norms, embeddings) of frozen too
    def loss_embed(e):
        return _loss({**frozen, "embed_tokens": e}, lora, ids)

    g = jax.grad(loss_embed)(frozen["embed_tokens"])
    assert float(jnp.abs(g).max()) == 0.0
    # (without the stop_gradient the plain forward does differentiate the embedding)
    g_plain = jax.jit(jax.grad(lambda e: jnp.sum(forward({**frozen, "embed_tokens": e}, lora, ids, CFG))))(
        frozen["embed_tokens"])
    assert float(jnp.abs(g_plain).max()) > 0.0


def test_targets_are_configurable(setup):
    params, _, _, ids = setup
    frozen = quantize_params(params, QCFG, targets=("q", "v_proj"))
    layer = frozen["layers"][0]
    assert isinstance(layer["q_proj"], QuantizedTensor) and isinstance(layer["v_proj"], QuantizedTensor)
    assert not isinstance(layer["k_proj"], QuantizedTensor) and layer["down_proj"] is params["layers"][0]["down_proj"]
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    lora = init_lora(frozen, lcfg, jax.random.key(0))
    assert set(lora["layers"][1]) == {"q_proj", "v_proj"}
    np.testing.assert_allclose(
        apply(frozen, lora, ids, CFG),
        forward(dequantize_params(frozen), None, ids, CFG), atol=1e-5,
    )
    with pytest.raises(ValueError, match="unknown LoRA/quantization target 'qkv'"):
        quantize_params(params, QCFG, targets=("qkv",))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(frozen, QCFG, targets=("q_proj",))


def test_clip_logits_are_used(setup):
    params, _, _, _ = setup
    w = params["layers"][1]["up_proj"]
    gamma, beta = init_clip(w.shape, QCFG)
    clip = ClipLogits(gamma - 3.0, beta - 3.0)  # tighter clipping range
    frozen = quantize_params(params, QCFG, targets=("up_proj",), clips={"layers": [{}, {"up_proj": clip}]})
    expected = quantize(w, QCFG, clip=clip)
    np.testing.assert_array_equal(np.asarray(frozen["layers"][1]["up_proj"].codes), np.asarray(expected.codes))
    plain = quantize(w, QCFG)
    assert not np.array_equal(np.asarray(plain.scales), np.asarray(expected.scales))
    with pytest.raises(ValueError, match="not quantized.*layers.0.q_proj"):
        quantize_params(params, QCFG, targets=("up_proj",), clips={"layers": [{"q_proj": clip}]})


def test_block_forward_accepts_quantized_leaves_and_lora(setup):
    _, frozen, lora, ids = setup
    lora = _nonzero_b(lora, seed=5)
    x = embed(frozen, ids, CFG)
    y_q = jax.jit(block_forward, static_argnames="config")(frozen["layers"][0], x, CFG, lora=lora["layers"][0])
    dense = merge_lora(frozen, lora)
    y_d = jax.jit(block_forward, static_argnames="config")(dense["layers"][0], x, CFG)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_d), atol=1e-5)


def test_quantize_model_init_options(setup):
    params, frozen, lora, _ = setup
    with pytest.raises(ValueError, match="needs key"):
        quantize_model(params, QCFG, LCFG)
    with pytest.raises(ValueError, match=r"init='svd'.*accepted"):
        quantize_model(params, QCFG, LCFG, init="svd")
    f2, l2 = quantize_model(params, QCFG, LCFG, init="factors", factors=_nonzero_b(lora))
    np.testing.assert_array_equal(np.asarray(l2["layers"][0]["k_proj"]["b"]),
                                  np.asarray(_nonzero_b(lora)["layers"][0]["k_proj"]["b"]))


def test_nnx_module_holds_quantized_weights(setup):
    from flax import nnx

    _, frozen, _, ids = setup
    model = LlamaForCausalLM(CFG, frozen)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(apply(frozen, None, ids, CFG)), atol=1e-5)
    trainable = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in trainable)  # codes are not Params
    assert isinstance(model.params["layers"][0]["o_proj"], QuantizedTensor)


def test_stories260k_quantized_group_padding():
    """stories260K (MLP 172): 4-bit RTN stays close to fp, 2-bit much worse, b = 0 exact."""
    path = require_shared("models", "stories260K")
    model = load_pretrained(path)
    ids = jnp.asarray(np.load(require_shared("data", "tinystories260K", "eval.npy"))[:2, :64])
    ref = np.asarray(model(ids))
    errs = {}
    for bits in (2, 4):
        frozen, lora = quantize_model(model.params, QuantConfig(bits=bits, group_size=64), LCFG,
                                      key=jax.random.key(0))
        assert frozen["layers"][0]["down_proj"].n_groups == 3
        q = np.asarray(apply(frozen, lora, ids, model.config))
        np.testing.assert_allclose(q, np.asarray(_forward_jit(dequantize_params(frozen), None, ids, model.config)),
                                   atol=1e-4)
        errs[bits] = np.abs(q - ref).mean()
    assert errs[4] < errs[2] / 3


def test_non_finite_weight_is_rejected(setup):
    params, _, _, _ = setup
    layers = [dict(layer) for layer in params["layers"]]
    layers[1]["gate_proj"] = layers[1]["gate_proj"].at[3, 5].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layers.1.gate_proj: weight contains 1 non-finite value\(s\) \(first at index"):
        quantize_params({**params, "layers": layers}, QCFG)
