"""Logit parity of the JAX decoder with transformers' PyTorch implementation (torch CPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.models import (
    LlamaForCausalLM,
    ModelConfig,
    block_forward,
    embed,
    final_logits,
    forward,
    load_pretrained,
)
from tests.conftest import require_module, require_shared
from tests.models.hf_helpers import TINY, random_ids, save_hf_model, torch_logits

torch = require_module("torch")

TOL = 1e-4


@pytest.fixture(scope="module")
def stories():
    path = require_shared("models", "stories260K")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, load_pretrained(path), hf


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    kind = request.param
    hf, path = save_hf_model(kind, tmp_path_factory.mktemp(kind))
    return kind, hf, load_pretrained(path)


def test_stories260k_config(stories):
    _, model, _ = stories
    cfg = model.config
    assert (cfg.architecture, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        "LlamaForCausalLM", 64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)
    assert cfg.tie_word_embeddings and "lm_head" not in model.params


def test_stories260k_logits_match_torch(stories):
    path, model, hf = stories
    eval_ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:4]
    ours = np.asarray(model(eval_ids))
    ref = torch_logits(hf, eval_ids)
    assert ours.shape == (4, 256, 512) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL


def test_stories260k_greedy_reference(stories):
    """Greedy continuation from BOS equals the verified llama2.c reference (first 40 tokens)."""
    path, model, _ = stories
    ref = json.loads((path / "verify_model.json").read_text())["greedy_ids"][:40]
    buf = np.zeros((1, 40), np.int32)  # fixed shape: one compilation; causal, so the tail is inert
    buf[0, 0] = 1
    for t in range(1, 40):
        buf[0, t] = int(np.argmax(np.asarray(model(buf))[0, t - 1]))
    assert buf[0].tolist() == ref


def test_tiny_models_logits_match_torch(tiny):
    kind, hf, model = tiny
    ids = random_ids(model.config.vocab_size, (2, 24), seed=1)
    ours = np.asarray(model(ids))
    ref = torch_logits(hf, ids)
    assert np.abs(ref).max() > 1.0  # non-trivial logits, so the tolerance means something
    assert np.abs(ours - ref).max() <= TOL, kind


def test_tiny_model_configs(tiny):
    kind, _, model = tiny
    cfg, params = model.config, model.params
    layer = params["layers"][0]
    if kind == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
        assert {"q_proj_bias", "k_proj_bias", "v_proj_bias"} <= set(layer) and "o_proj_bias" not in layer
    if kind == "llama3":
        assert cfg.rope_type == "llama3" and cfg.rope_factor == 8.0 and cfg.head_dim == 16
        assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias and "down_proj_bias" in layer
    if kind == "mistral":
        assert cfg.sliding_window == 8 and cfg.attention_window(0) == 8
    if kind == "llama":
        assert cfg.attention_window(0) is None and "lm_head" in params


def test_rope_inv_freq_matches_transformers(tiny):
    kind, hf, model = tiny
    ours = model.config.inv_freq()
    ref = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_torch(tiny, side):
    kind, hf, model = tiny
    ids = random_ids(model.config.vocab_size, (3, 16), seed=2)
    mask = np.ones_like(ids)
    pad = [0, 5, 11]
    for row, n in enumerate(pad):
        if n:
            if side == "right":
                mask[row, -n:] = 0
            else:
                mask[row, :n] = 0
    ours = np.asarray(model(ids, attention_mask=jnp.asarray(mask)))
    ref = torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= TOL
    # padding really changes the result of the rows that have it (the mask is not ignored)
    plain = np.asarray(model(ids))
    if side == "left":
        assert np.abs(plain - ours)[2][valid[2]].max() > 1e-3


def test_functional_core_composes_to_forward(tiny):
    """embed -> block_forward per layer -> final_logits equals forward (calibration's path)."""
    _, _, model = tiny
    cfg, params = model.config, model.params
    ids = jnp.asarray(random_ids(cfg.vocab_size, (2, 12), seed=3))
    x = embed(params, ids, cfg)
    for i, layer in enumerate(params["layers"]):
        x = block_forward(layer, x, cfg, layer_idx=i)
    np.testing.assert_allclose(final_logits(params, x, cfg), forward(params, None, ids, cfg), atol=1e-5)


def test_bfloat16_close_to_torch_bfloat16(stories):
    path, _, hf = stories
    import transformers

    ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:2, :128]
    model16 = load_pretrained(path, dtype="bfloat16")
    assert model16.params["layers"][0]["q_proj"].dtype == jnp.bfloat16
    ours = np.asarray(model16(ids)).astype(np.float32)
    assert model16(ids).dtype == jnp.bfloat16
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ref16 = torch_logits(hf16, ids)
    ref32 = torch_logits(hf, ids)
    err_ours = np.abs(ours - ref32).max()
    err_torch = np.abs(ref16 - ref32).max()
    # both bf16 implementations are about equally far from fp32, and agree on the argmax
    assert err_ours <= 2.0 * err_torch + 0.05
    assert (ours.argmax(-1) == ref32.argmax(-1)).mean() > 0.97


def test_nnx_module_random_init_and_params_roundtrip():
    cfg = ModelConfig("LlamaForCausalLM", 64, 32, 48, 2, 4, 2, 8)
    from flax import nnx

    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    params = model.params
    assert params["layers"][1]["down_proj"].shape == (32, 48)
    again = LlamaForCausalLM(cfg, params)
    ids = random_ids(64, (1, 5))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == sum(x.size for x in jax.tree.leaves(params))


def test_module_rejects_bad_ids_and_params():
    cfg = ModelConfig("LlamaForCausalLM", 64, 32, 48, 2, 4, 2, 8)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="out of range.*64"):
        model(np.array([[1, 64]], np.int32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(np.array([1, 2], np.int32))
    params = model.params
    params["layers"][0]["q_proj"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match="layers.0.q_proj: expected"):
        LlamaForCausalLM(cfg, params)


# --- stacked layers (lax.scan), chunked attention, remat ----------------------------------------
from apiq_jax.lora import LoraConfig  # noqa: E402
from apiq_jax.models import llama as L  # noqa: E402
from apiq_jax.models import quantize_model  # noqa: E402
from apiq_jax.quant import QuantConfig  # noqa: E402


def _rel(a, b) -> float:
    """max |a - b| / max |b| over a pytree (float64)."""
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return max(np.abs(x - y).max() for x, y in zip(la, lb)) / max(np.abs(y).max() for y in lb)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunked attention in blocks of 4 query rows on the tiny shapes."""
    monkeypatch.setattr(L, "ATTENTION_MIN_ROWS", 4)
    monkeypatch.setattr(L, "ATTENTION_CHUNK_SCORES", 1)


def test_stacked_and_chunked_forward_match_torch(tiny, small_chunks):
    """The scan over stacked layers with chunked attention keeps transformers parity."""
    kind, hf, model = tiny
    cfg, params = model.config, model.params
    ids = random_ids(cfg.vocab_size, (2, 24), seed=1)
    stacked = L.stack_layers(params)
    assert L.is_stacked(stacked) and not L.is_stacked(params)
    assert L.attention_chunk_rows(2, cfg.num_attention_heads, 24) == 4  # 6 blocks of 4 queries
    ours = np.asarray(jax.jit(lambda p, i: forward(p, None, i, cfg, attention_impl="chunked"))(stacked, jnp.asarray(ids)))
    ref = torch_logits(hf, ids)
    assert np.abs(ours - ref).max() <= TOL, kind
    # and the plain path, unrolled, gives the same logits within float32 rounding
    plain = np.asarray(forward(params, None, jnp.asarray(ids), cfg, attention_impl="plain"))
    assert _rel(ours, plain) <= 1e-5


def _quantized(kind_cfg: ModelConfig, seed: int = 0):
    params = L.init_params(kind_cfg, jax.random.key(seed), std=0.1)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=32), LoraConfig(rank=4, alpha=8),
                                  key=jax.random.key(seed + 1))
    keys = iter(jax.random.split(jax.random.key(seed + 2), 64))
    lora = lora.replace({"layers": [{n: {"a": ab["a"], "b": 0.1 * jax.random.normal(next(keys), ab["b"].shape)}
                                     for n, ab in layer.items()} for layer in lora["layers"]]})
    return frozen, lora


MIXED = ModelConfig("MistralForCausalLM", 64, 64, 96, 4, 4, 2, 16, sliding_window=5,
                    layer_types=("sliding_attention", "full_attention", "full_attention", "sliding_attention"))


@pytest.mark.parametrize("remat", ["none", "block", "dots", "sqrt"])
def test_scan_and_remat_equal_the_unrolled_model(remat, small_chunks):
    """Stacked layers (a scan with the window scanned for mixed layer kinds), each remat policy,
    chunked attention and padding: logits and LoRA gradients equal the unrolled plain model."""
    frozen, lora = _quantized(MIXED)
    ids = jnp.asarray(random_ids(64, (2, 20), seed=4))
    mask = jnp.ones((2, 20), jnp.int32).at[1, 15:].set(0)  # right padding: every query sees a real key

    def loss(params, lo, **kw):
        logits = forward(jax.lax.stop_gradient(params), lo, ids, MIXED, attention_mask=mask, backend="xla", **kw)
        return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0) ** 2), logits

    (_, ref_logits), ref_g = jax.jit(jax.value_and_grad(lambda lo: loss(frozen, lo, attention_impl="plain"),
                                                        has_aux=True))(lora)
    sf, sl = L.stack_layers(frozen), lora.stack_layers()
    (_, logits), g = jax.jit(jax.value_and_grad(
        lambda lo: loss(sf, lo, remat=remat, attention_impl="chunked"), has_aux=True))(sl)
    valid = np.asarray(mask, bool)
    assert _rel(np.asarray(logits)[valid], np.asarray(ref_logits)[valid]) <= 1e-6
    assert _rel(g.unstack_layers(), ref_g) <= 1e-5  # measured ~1e-7; the attention-score path amplifies rounding
    # the same policy on the unrolled layers
    (_, logits_u), g_u = jax.jit(jax.value_and_grad(lambda lo: loss(frozen, lo, remat=remat), has_aux=True))(lora)
    assert _rel(g_u, ref_g) <= 1e-5


def test_bfloat16_scan_with_block_remat_matches_the_unrolled_model():
    """16-bit "block" remat (its own VJP: the block input kept as raw 16-bit words) gives the
    gradients of the unrolled bfloat16 model."""
    frozen, lora = _quantized(MIXED)
    frozen16 = L.cast_params(frozen, "bfloat16")
    ids = jnp.asarray(random_ids(64, (2, 16), seed=5))

    def loss(params, lo, **kw):
        logits = forward(jax.lax.stop_gradient(params), lo, ids, MIXED, backend="xla", **kw)
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))

    ref_l, ref_g = jax.jit(jax.value_and_grad(lambda lo: loss(frozen16, lo)))(lora)
    for remat in ("block", "sqrt"):
        l16, g16 = jax.jit(jax.value_and_grad(lambda lo: loss(L.stack_layers(frozen16), lo, remat=remat)))(
            lora.stack_layers())
        # the same forward, up to where XLA keeps 16-bit intermediates in float32 (excess precision)
        assert abs(float(l16) - float(ref_l)) <= 2e-3 * abs(float(ref_l))  # measured 1.3e-4
        assert jax.tree.leaves(g16)[0].dtype == jnp.float32  # gradients of the float32 master weights
        assert _rel(g16.unstack_layers(), ref_g) <= 2e-2  # bfloat16: recomputation may round differently
    f32_l = jax.jit(lambda lo: loss(frozen, lo))(lora)
    assert abs(float(ref_l) - float(f32_l)) <= 2e-2 * abs(float(f32_l))  # and bfloat16 is near float32


def test_stack_layers_round_trip_and_errors():
    frozen, lora = _quantized(MIXED)
    stacked = L.stack_layers(frozen)
    q = stacked["layers"]["q_proj"]
    assert isinstance(q, type(frozen["layers"][0]["q_proj"])) and q.codes.shape[0] == 4
    assert q.shape == frozen["layers"][0]["q_proj"].shape  # static metadata: the per-layer shape
    assert stacked["embed_tokens"] is frozen["embed_tokens"] and L.stack_layers(stacked) is stacked
    back = L.unstack_layers(stacked)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(back) == jax.tree.structure(frozen)
    sl = L.stack_layers(lora)
    assert sl.is_stacked and sl["layers"]["q_proj"].a.shape == (4, 64, 4)
    assert [lo["q_proj"].a.shape for lo in sl.layers] == [(64, 4)] * 4
    # block_outputs of stacked params: the same per-block states
    ids = jnp.asarray(random_ids(64, (1, 9), seed=6))
    for a, b in zip(L.block_outputs(stacked, ids, MIXED, lora=sl), L.block_outputs(frozen, ids, MIXED, lora=lora)):
        assert _rel(a, b) <= 1e-6
    mixed = dict(frozen, layers=[frozen["layers"][0], {**frozen["layers"][1], "q_proj": jnp.zeros((64, 64))}])
    with pytest.raises(ValueError, match=r"stack_layers: layers.1.q_proj is an array \(64, 64\) float32 where "
                                         r"layers.0.q_proj is a QuantizedTensor \(64, 64\)"):
        L.stack_layers(mixed)
    with pytest.raises(ValueError, match="stacked params hold 2 layers; the config has 4"):
        forward(L.stack_layers(dict(frozen, layers=frozen["layers"][:2])), None, ids, MIXED)


def test_bad_remat_and_attention_impl_are_one_line_errors():
    frozen, _ = _quantized(MIXED)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"^remat='full' is not supported; accepted: \('none', 'block', 'dots', 'sqrt'\)$"):
        forward(frozen, None, ids, MIXED, remat="full")
    with pytest.raises(ValueError, match=r"^attention impl='flash' is not supported; accepted: \('auto', 'plain', 'blocks', 'chunked', 'fused'\)$"):
        forward(frozen, None, ids, MIXED, attention_impl="flash")


def test_cast_params_and_helpers():
    frozen, _ = _quantized(MIXED)
    half = L.cast_params(frozen, "bfloat16")
    assert half["embed_tokens"].dtype == jnp.bfloat16 and half["layers"][0]["q_proj"].dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(half["layers"][0]["q_proj"].codes), np.asarray(frozen["layers"][0]["q_proj"].codes))
    assert L.cast_params(frozen, "float32")["embed_tokens"] is frozen["embed_tokens"]
    with pytest.raises(ValueError, match="dtype='int8' is not a floating dtype"):
        L.cast_params(frozen, "int8")
    assert [L.sqrt_group_size(n) for n in (1, 2, 5, 8, 16, 32)] == [1, 1, 1, 2, 4, 4]
    # rows per chunk: the largest power of two whose scores fit the budget (at least the minimum)
    assert L.attention_chunk_rows(4, 16, 1024) * 4 * 16 * 1024 <= L.ATTENTION_CHUNK_SCORES
    assert L.attention_chunk_rows(1, 1, 16) >= 16  # small problems: one block, the plain path


# --- the CPU-speed formulations: causal-block attention and the LoRA products' VJP ---------
def _attention_f64(q, k, v, mask):
    """float64 numpy softmax attention: q [b, q, kvh, g, hd], k/v [b, s, kvh, hd], mask [b|1, q, s]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("bqkgd,bskd->bkgqs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, None, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgqs,bskd->bqkgd", p, v)


@pytest.mark.parametrize("s, window, padded", [(200, None, False), (128, 5, False), (192, None, True)])
def test_causal_block_attention_equals_float64_softmax_attention(s, window, padded):
    import apiq_jax.models.llama as L

    rng = np.random.default_rng(s)
    b, kvh, g, hd = 2, 2, 3, 8
    q = jnp.asarray(rng.standard_normal((b, s, kvh, g, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), jnp.float32)
    attention_mask = None
    if padded:  # right padding of the second row; padded queries are not compared
        attention_mask = jnp.asarray(np.arange(s)[None] < np.array([[s], [s - 7]]), jnp.int32)
    mask = L.attention_mask_matrix(s, attention_mask, window)
    rows = L.causal_block_rows(s)
    assert 1 < -(-s // rows) <= L.ATTENTION_CAUSAL_BLOCKS  # really several blocks, the last one shorter for s=200
    ref = _attention_f64(q, k, v, mask)
    keep = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    for fn in (L._attend, L._attend_causal_blocks):
        out = np.asarray(jax.jit(fn)(q, k, v, mask))
        np.testing.assert_allclose(out[keep], ref[keep], atol=2e-6, rtol=1e-5)
    # gradients of the blocks equal those of one softmax over all scores (jax.nn.softmax)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * keep[:, :, None, None, None]

    def softmax_attention(q, k, v):
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / np.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(lambda q, k, v: L._attend_causal_blocks(q, k, v, mask)), grads(softmax_attention)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_causal_block_rows():
    import apiq_jax.models.llama as L

    assert L.causal_block_rows(100) == 100  # shorter than two minimum blocks: one block
    assert L.causal_block_rows(128) == 64
    assert L.causal_block_rows(256) == 64
    assert L.causal_block_rows(2048) == 256  # at most ATTENTION_CAUSAL_BLOCKS blocks
    assert L.causal_block_rows(200) == 67


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_lora_products_vjp_equals_autodiff_of_the_plain_products(dtype, tol):
    import apiq_jax.models.llama as L
    from apiq_jax.lora import Lora, LoraConfig

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 40, 24)), dtype)
    a = jnp.asarray(rng.standard_normal((24, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 56)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 40, 56)), jnp.float32)

    def ours(x, a, b):
        return jnp.sum(L._lora_term(x, Lora({"a": a, "b": b}, LoraConfig(rank=4, alpha=2.0))).astype(jnp.float32) * ct)

    def plain(x, a, b):  # float32 reference, autodiff
        return jnp.sum(0.5 * ((x.astype(jnp.float32) @ a) @ b) * ct)

    got = jax.value_and_grad(ours, argnums=(0, 1, 2))(x, a, b)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, a, b)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= tol * np.abs(w).max()


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("lead", [(3, 40), (3, 7)])  # an even and an odd number of rows
def test_16bit_lora_linear_matches_float32(quantized, lead):
    """A 16-bit linear with a LoRA (quantized: one fused dot, :func:`L._qlora16`; dense: the
    16-bit gradient products of :func:`L._lora_matmuls`) runs jitted (every dot in a form
    XLA's CPU backend executes) and gives the float32 linear's value and gradients to
    bfloat16 rounding."""
    import dataclasses

    import apiq_jax.models.llama as L
    from apiq_jax.lora import Lora, LoraConfig
    from apiq_jax.quant import QuantConfig, quantize

    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((56, 40)) * 0.1, jnp.float32)
    w = quantize(w, QuantConfig(bits=2, group_size=32)) if quantized else w  # 40 inputs: a padded group
    x = jnp.asarray(rng.standard_normal((*lead, 40)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((40, 4)) * 0.1, jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 56)) * 0.1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((*lead, 56)), jnp.float32)

    def loss(x, a, b, w):
        lora = Lora({"a": a, "b": b}, LoraConfig(rank=4, alpha=8.0))
        return jnp.sum(L.linear(x, w, lora, backend="xla").astype(jnp.float32) * ct)

    w16 = dataclasses.replace(w, dtype="bfloat16") if quantized else w.astype(jnp.bfloat16)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x.astype(jnp.bfloat16), a, b, w16)
    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, a, b, w)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == got[1][2].dtype == jnp.float32
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # value, dx, da, db
        assert g.shape == ref.shape and _rel(g, ref) <= 2e-2


def test_dense_matmul_vjp_equals_autodiff_of_the_plain_product():
    """The trained-weight path (ApiQ's fake-quantized weights): dx and dw of x @ w^T."""
    import apiq_jax.models.llama as L

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 30, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 30, 40)), jnp.float32)
    got = jax.value_and_grad(lambda x, w: jnp.sum(L._dense_matmul(x, w) * ct), argnums=(0, 1))(x, w)
    x64, w64, ct64 = (np.asarray(t, np.float64) for t in (x, w, ct))
    want = (np.sum((x64 @ w64.T) * ct64), (ct64 @ w64, np.einsum("bmo,bmi->oi", ct64, x64)))
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float64), w_, rtol=1e-5, atol=1e-4)
