"""LoRA pytree helpers: config, QLoRA init, given factors, scaling, merge."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.lora import (
    LINEARS,
    Lora,
    LoraConfig,
    init_lora,
    lora_delta,
    lora_from_factors,
    merge_lora,
    normalize_targets,
    num_lora_params,
)
from apiq_jax.models import ModelConfig, forward, init_params, linear
from apiq_jax.quant import QuantConfig, quantize
from tests.conftest import require_module

CFG = ModelConfig("LlamaForCausalLM", 50, 32, 72, 2, 4, 2, 8)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), std=0.1)


def test_config_validation_and_aliases():
    cfg = LoraConfig(rank=8, alpha=16, targets="q,v")
    assert cfg.targets == ("q_proj", "v_proj") and cfg.scale == 2.0
    assert LoraConfig().targets == LINEARS and LoraConfig().scale == 16 / 64
    assert hash(cfg) == hash(LoraConfig(rank=8, alpha=16.0, targets=("v_proj", "q")))
    assert normalize_targets("all") == LINEARS
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="rank=0 must be a positive int"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="alpha=-1"):
        LoraConfig(alpha=-1)
    with pytest.raises(ValueError, match=r"unknown LoRA/quantization target 'qkv'.*accepted"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="at least one"):
        LoraConfig(targets=())


def test_qlora_init_shapes_and_distribution(params):
    cfg = LoraConfig(rank=16, alpha=32)
    lora = init_lora(params, cfg, jax.random.key(1))
    assert len(lora["layers"]) == 2 and set(lora["layers"][0]) == set(LINEARS)
    down = lora["layers"][1]["down_proj"]
    assert down["a"].shape == (72, 16) and down["b"].shape == (16, 32)
    assert num_lora_params(lora) == sum(
        (w.shape[1] + w.shape[0]) * 16 for layer in params["layers"] for n, w in layer.items() if n in LINEARS
    )
    for layer in lora["layers"]:
        for name, ab in layer.items():
            in_f = ab["a"].shape[0]
            a = np.asarray(ab["a"])
            assert float(jnp.abs(ab["b"]).max()) == 0.0
            bound = 1 / math.sqrt(in_f)
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
            assert abs(a.std() - bound / math.sqrt(3)) < 0.15 * bound  # uniform(-bound, bound)
    a0 = lora["layers"][0]["q_proj"]["a"]
    assert not np.array_equal(np.asarray(a0), np.asarray(lora["layers"][0]["k_proj"]["a"]))
    again = init_lora(params, cfg, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(again["layers"][0]["q_proj"]["a"]))


def test_qlora_bound_matches_torch_kaiming_uniform():
    """peft initialises lora_A [r, in] with kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(in)."""
    torch = require_module("torch")
    w = torch.empty(64, 72)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1 / math.sqrt(72)
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound


def test_init_works_on_quantized_weights_and_rejects_bad_method(params):
    frozen = {**params, "layers": [{**layer, "q_proj": quantize(layer["q_proj"], QuantConfig())}
                                   for layer in params["layers"]]}
    lora = init_lora(frozen, LoraConfig(rank=4, targets=("q",)), jax.random.key(0))
    assert lora["layers"][0]["q_proj"]["a"].shape == (32, 4)
    with pytest.raises(ValueError, match=r"method='gaussian'.*accepted"):
        init_lora(params, LoraConfig(rank=4), jax.random.key(0), method="gaussian")
    zeros = init_lora(params, LoraConfig(rank=4), jax.random.key(0), method="zeros")
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(zeros))


def test_linear_formula():
    k = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k[0], (2, 3, 10))
    w = jax.random.normal(k[1], (6, 10))
    ab = {"a": jax.random.normal(k[2], (10, 4)), "b": jax.random.normal(k[3], (4, 6))}
    expected = np.asarray(x) @ np.asarray(w).T + 0.5 * (np.asarray(x) @ np.asarray(ab["a"])) @ np.asarray(ab["b"])
    lora = Lora(ab, LoraConfig(rank=4, alpha=2.0))  # scale 0.5 carried by the tree
    np.testing.assert_allclose(np.asarray(linear(x, w, lora)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora_delta(lora)),
                               0.5 * (np.asarray(ab["a"]) @ np.asarray(ab["b"])).T, rtol=1e-5, atol=1e-6)


def test_from_factors_nested_and_flat(params):
    cfg = LoraConfig(rank=2, alpha=4, targets=("o_proj",))
    k = iter(jax.random.split(jax.random.key(7), 8))
    flat = {f"layers.{i}.o_proj": (jax.random.normal(next(k), (32, 2)), jax.random.normal(next(k), (2, 32)))
            for i in range(2)}
    lora = lora_from_factors(params, cfg, flat)
    np.testing.assert_array_equal(np.asarray(lora["layers"][1]["o_proj"]["b"]), np.asarray(flat["layers.1.o_proj"][1]))
    same = lora_from_factors(params, cfg, lora)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), lora, same))
    bad = dict(flat)
    bad["layers.0.o_proj"] = (jnp.zeros((32, 3)), jnp.zeros((3, 32)))
    with pytest.raises(ValueError, match=r"layers.0.o_proj: got a \(32, 3\).*expected a \(32, 2\)"):
        lora_from_factors(params, cfg, bad)
    with pytest.raises(ValueError, match=r"missing \['layers.1.o_proj'\]"):
        lora_from_factors(params, cfg, {"layers.0.o_proj": flat["layers.0.o_proj"]})


def test_merge_lora_matches_forward_with_lora(params):
    cfg = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    lora = init_lora(params, cfg, jax.random.key(2))
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # b != 0
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
    with_lora = forward(params, lora, ids, CFG)
    merged = merge_lora(params, lora)
    np.testing.assert_allclose(np.asarray(forward(merged, None, ids, CFG)), np.asarray(with_lora), atol=1e-5)
    assert not np.allclose(np.asarray(forward(params, None, ids, CFG)), np.asarray(with_lora), atol=1e-3)
    assert merged["embed_tokens"] is params["embed_tokens"]
    with pytest.raises(ValueError, match="LoRA has 1 layers, params have 2"):
        merge_lora(params, lora.replace({"layers": lora.factors["layers"][:1]}))


def test_stack_and_unstack_layers(params):
    lora = init_lora(params, LoraConfig(rank=4, alpha=8, targets="q,down"), jax.random.key(3))
    st = lora.stack_layers()
    assert st.is_stacked and not lora.is_stacked and st.config == lora.config
    assert st["layers"]["q_proj"].a.shape == (2, 32, 4) and st["layers"]["down_proj"].b.shape == (2, 4, 32)
    assert st.stack_layers() is st and lora.unstack_layers() is lora
    back = st.unstack_layers()
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(st.layers[1]["q_proj"].a), np.asarray(lora["layers"][1]["q_proj"].a))
    uneven = Lora({"layers": [lora.factors["layers"][0], {"q_proj": lora.factors["layers"][1]["q_proj"]}]}, lora.config)
    with pytest.raises(ValueError, match="LoRA layer 1 differs from layer 0"):
        uneven.stack_layers()
    with pytest.raises(ValueError, match="needs a model-level Lora"):
        lora["layers"][0].stack_layers()


def test_init_lora_layer_is_init_lora_one_layer_at_a_time():
    from apiq_jax.lora import init_lora_layer

    params = {"layers": [{"q_proj": jnp.zeros((8, 16)), "down_proj": jnp.zeros((16, 24))} for _ in range(3)]}
    cfg, key = LoraConfig(rank=4, targets=("q", "down")), jax.random.key(3)
    whole = init_lora(params, cfg, key, dtype=jnp.bfloat16)
    for i in range(3):
        layer = init_lora_layer(params, cfg, key, i, dtype=jnp.bfloat16)
        for x, y in zip(jax.tree.leaves(layer.factors), jax.tree.leaves(whole["layers"][i].factors), strict=True):
            assert x.dtype == y.dtype and bool((x == y).all())
    with pytest.raises(ValueError, match="layer index 3 is out of range"):
        init_lora_layer(params, cfg, key, 3)
