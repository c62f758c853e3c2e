"""The fused CPU attention kernel against a float64 NumPy reference, its gradients against autodiff."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.cpu_kernels import attention
from apiq_jax.models import llama

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX")),
                                reason="no C++ compiler: the fused CPU attention cannot be built")


def test_kernel_builds_where_a_compiler_is():
    """With a compiler on the machine the kernel must build (the tests below would otherwise test nothing)."""
    assert attention.unavailable_reason() is None

#: float32 kernel against float64 NumPy: outputs of magnitude ~1
TOL = 2e-5


def numpy_attention(q, k, v, mask):
    """Causal softmax attention in float64 NumPy, one head at a time (fully masked rows: mean of values 0..i)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.broadcast_to(np.asarray(mask, bool), (q.shape[0],) + mask.shape[1:])
    b, s, kvh, g, hd = q.shape
    out = np.zeros(q.shape)
    for bi in range(b):
        for kv in range(kvh):
            for gi in range(g):
                for i in range(s):
                    vis = mask[bi, i, : i + 1]
                    if not vis.any():
                        out[bi, i, kv, gi] = v[bi, : i + 1, kv].mean(0)
                        continue
                    sc = k[bi, : i + 1, kv] @ q[bi, i, kv, gi] / np.sqrt(hd)
                    sc = np.where(vis, sc, -np.inf)
                    p = np.exp(sc - sc.max())
                    out[bi, i, kv, gi] = (p / p.sum()) @ v[bi, : i + 1, kv]
    return out


def operands(b, s, kvh, g, hd, seed=0, scale=1.0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(scale * r.standard_normal((b, s, kvh, g, hd)), jnp.float32)
    k = jnp.asarray(scale * r.standard_normal((b, s, kvh, hd)), jnp.float32)
    v = jnp.asarray(r.standard_normal((b, s, kvh, hd)), jnp.float32)
    return q, k, v


def padded_window_mask(b, s, pad, window):
    """Causal mask, a sliding window, and ``pad[i]`` left-padded (masked) keys in batch row i."""
    m = np.tril(np.ones((s, s), bool)) & ~np.tril(np.ones((s, s), bool), -window)
    m = np.repeat(m[None], b, 0)
    for i, p in enumerate(pad):
        m[i, :, :p] = False
    return jnp.asarray(m)


@pytest.mark.parametrize("b,s,kvh,g,hd", [(2, 37, 2, 2, 16), (1, 100, 1, 4, 32), (3, 24, 3, 1, 64),
                                          (1, 1, 1, 1, 16), (2, 65, 2, 3, 48), (2, 30, 4, 2, 8), (1, 20, 1, 1, 12)])
def test_forward_matches_float64_causal(b, s, kvh, g, hd):
    q, k, v = operands(b, s, kvh, g, hd, seed=s, scale=2.0)
    mask = jnp.tril(jnp.ones((1, s, s), bool))
    out = np.asarray(jax.jit(attention.fused_attention)(q, k, v, mask))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), atol=TOL, rtol=0)


def test_forward_padding_window_and_fully_masked_rows():
    """Per-batch masks: a sliding window and left padding, so rows 0..pad-1 see no key at all."""
    b, s = 3, 40
    q, k, v = operands(b, s, 2, 2, 16, seed=3, scale=3.0)
    mask = padded_window_mask(b, s, pad=(0, 5, 17), window=9)
    ref = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(attention.fused_attention(q, k, v, mask)), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(attention.attention_reference(q, k, v, mask)), ref, atol=TOL, rtol=0)


def test_large_scores_do_not_overflow():
    q, k, v = operands(1, 50, 1, 2, 32, seed=4, scale=30.0)  # scores up to ~1e3: exp needs the max shift
    mask = jnp.tril(jnp.ones((1, 50, 50), bool))
    out = np.asarray(attention.fused_attention(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_kind", ["causal", "padded_window"])
def test_gradients_match_autodiff_of_reference(mask_kind):
    b, s, kvh, g, hd = 2, 45, 2, 2, 32
    q, k, v = operands(b, s, kvh, g, hd, seed=5, scale=1.5)
    if mask_kind == "causal":
        mask = jnp.tril(jnp.ones((1, s, s), bool))
    else:
        mask = padded_window_mask(b, s, pad=(0, 6), window=11)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w), (0, 1, 2)))(q, k, v)

    ours, ref = loss(attention.fused_attention), loss(attention.attention_reference)
    for name, a, r in zip("qkv", ours, ref):
        assert float(jnp.max(jnp.abs(r))) > 0.1, name  # non-trivial gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5, rtol=0, err_msg=name)


def test_vmap_and_broadcast_mask():
    """vmap over an extra axis runs the call per slice; a [1, s, s] mask serves every batch row."""
    q, k, v = operands(2, 20, 1, 2, 16, seed=7)
    mask = jnp.tril(jnp.ones((1, 20, 20), bool))
    stacked = jax.vmap(attention.fused_attention, in_axes=(0, 0, 0, None))(q[:, None], k[:, None], v[:, None], mask)
    np.testing.assert_allclose(np.asarray(stacked[:, 0]), numpy_attention(q, k, v, mask), atol=TOL, rtol=0)


def test_model_attention_fused_matches_plain():
    """The decoder with impl="fused" against impl="plain": logits and LoRA gradients."""
    from apiq_jax.lora import LoraConfig, init_lora
    from apiq_jax.models.config import ModelConfig
    from apiq_jax.training import causal_lm_loss

    cfg = ModelConfig("LlamaForCausalLM", 64, 64, 96, 2, 4, 2, 16)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    lora = init_lora(params, LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(1))
    leaves, tree = jax.tree.flatten(lora)
    lora = jax.tree.unflatten(tree, [0.1 * jax.random.normal(jax.random.PRNGKey(i), x.shape) for i, x in enumerate(leaves)])
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 64, (2, 33)), jnp.int32)
    logits = {impl: np.asarray(llama.forward(params, lora, ids, cfg, attention_impl=impl)) for impl in ("plain", "fused")}
    assert np.abs(logits["plain"]).max() > 0.1
    np.testing.assert_allclose(logits["fused"], logits["plain"], atol=1e-4, rtol=0)
    grads = {impl: jax.grad(lambda lo, impl=impl: causal_lm_loss(params, lo, ids, cfg, attention_impl=impl))(lora)
             for impl in ("plain", "fused")}
    for a, r in zip(jax.tree.leaves(grads["fused"]), jax.tree.leaves(grads["plain"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-4)


def test_supports_and_refusals():
    q, k, v = operands(1, 8, 1, 1, 16)
    mask = jnp.tril(jnp.ones((1, 8, 8), bool))
    assert attention.supports(q, k, mask)
    assert not attention.supports(q.astype(jnp.bfloat16), k, mask)  # float32 only
    assert not attention.supports(q, k[:, :4], mask)  # keys of another length (a cache)
    assert not attention.supports(q, k, mask[:, :4])
    with pytest.raises(ValueError, match=r"^fused CPU attention takes float32 q .* got q \(1, 8, 1, 1, 16\) bfloat16"):
        attention.fused_attention(q.astype(jnp.bfloat16), k, v, mask)


def test_padded_head_dim_gradients():
    """head_dim 8 runs zero-padded to 16 with the scale of 8: gradients of the unpadded operands."""
    q, k, v = operands(2, 19, 2, 2, 8, seed=9, scale=2.0)
    mask = jnp.tril(jnp.ones((1, 19, 19), bool))
    w = jnp.asarray(np.random.default_rng(10).standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) * w), (0, 1, 2))(q, k, v)
             for fn in (attention.fused_attention, attention.attention_reference)]
    for a, r in zip(*grads):
        assert a.shape == r.shape and float(jnp.max(jnp.abs(r))) > 0.1
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5, rtol=0)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(attention.ENV_SWITCH, "0")
    assert attention.unavailable_reason() == f"turned off by {attention.ENV_SWITCH}=0"
    q, k, _ = operands(1, 8, 1, 1, 16)
    assert not attention.supports(q, k, jnp.tril(jnp.ones((1, 8, 8), bool)))


@pytest.mark.parametrize("head_dim,dtype,fused", [(16, jnp.float32, True), (8, jnp.float32, True),
                                                  (16, jnp.bfloat16, False)])
def test_auto_picks_the_kernel_where_it_applies(head_dim, dtype, fused):
    from apiq_jax.models.config import ModelConfig

    cfg = ModelConfig("LlamaForCausalLM", 64, 4 * head_dim, 96, 1, 4, 2, head_dim)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), dtype=dtype)
    ids = jnp.zeros((1, 12), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda p: llama.forward(p, None, ids, cfg))(params))
    assert (attention.FORWARD_TARGET in jaxpr) == fused
