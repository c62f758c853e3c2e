"""The fake-quantized product with a recomputing VJP (quant/fake_linear.py).

Reference: autodiff through :func:`apiq_jax.quant.fake_quantize` (itself checked against
the official quantizer's golden gradients in test_uniform.py). The hand-written scale
gradient sums the same products in another order, so the logits' gradients agree to float32
rounding (relative 1e-5 of their largest entry); values and ``dx`` are the same products.
Memory: XLA's own compiled-memory figure of one ApiQ-bw block program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import ClipLogits, FakeQuantWeight, QuantConfig, fake_quant_matmul, fake_quantize, init_clip


def _case(scheme: str, out: int, k: int, group: int, bits: int = 2):
    cfg = QuantConfig(bits=bits, group_size=group, scheme=scheme)
    keys = jax.random.split(jax.random.key(out * 1000 + k), 5)
    w = 0.05 * jax.random.normal(keys[0], (out, k))
    x = jax.random.normal(keys[1], (9, k))
    g = jax.random.normal(keys[2], (9, out))
    c0 = init_clip(w.shape, cfg)
    clip = ClipLogits(c0.gamma + jax.random.normal(keys[3], c0.gamma.shape),
                      c0.beta + jax.random.normal(keys[4], c0.beta.shape))
    return cfg, w, x, g, clip


@pytest.mark.parametrize("scheme", ["asym", "sym", "nf"])
@pytest.mark.parametrize("shape", [(24, 64, 16), (20, 172, 64)])  # 172: a padded last group
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("keep", [False, True])  # Q(W) recomputed in the backward pass, or kept from the forward
def test_values_and_gradients_are_autodiffs(scheme, shape, jit, keep):
    cfg, w, x, g, clip = _case(scheme, *shape)

    def ref(x, c):
        return jnp.sum((x @ fake_quantize(w, cfg, clip=c).T) * g)

    def new(x, c):
        return jnp.sum(fake_quant_matmul(x, w, c, cfg, keep) * g)

    grad = jax.value_and_grad
    (v_ref, g_ref), (v_new, g_new) = [
        (jax.jit(grad(f, argnums=(0, 1))) if jit else grad(f, argnums=(0, 1)))(x, clip) for f in (ref, new)]
    np.testing.assert_allclose(float(v_new), float(v_ref), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref), strict=True):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree.leaves(g_ref[1]))  # the logits learn


def test_the_weight_is_a_constant():
    cfg, w, x, g, clip = _case("asym", 8, 32, 16)
    dw = jax.grad(lambda w: jnp.sum(fake_quant_matmul(x, w, clip, cfg) * g))(w)
    assert not np.asarray(dw).any()


def test_linear_takes_a_fake_quant_weight():
    from apiq_jax.models.llama import linear

    cfg, w, x, _, clip = _case("asym", 12, 64, 32)
    got = linear(x.reshape(3, 3, 64), FakeQuantWeight(w, clip, cfg))
    want = x @ fake_quantize(w, cfg, clip=clip).T
    np.testing.assert_allclose(np.asarray(got).reshape(9, 12), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_block_training_memory_is_about_half_of_autodiffs(monkeypatch):
    """One ApiQ-bw block program (hidden 512, mlp 1408, r 16): XLA's temp bytes with and without it."""
    import apiq_jax.calibration.apiq_bw_core as core
    from apiq_jax.calibration import blocks
    from tests.calibration.block_memory import train_block_temp

    monkeypatch.setattr(blocks, "KEEP_QUANTIZED_MAX_ELEMENTS", 0)  # a block this small would keep Q(W)
    frugal, weights = train_block_temp(512, 1408, 8, rank=16, samples=4, seqlen=32)
    monkeypatch.setattr(core, "fake_quant_layer",  # plain autodiff through the quantizer
                        lambda layer, clips, qcfg, on_use=False: blocks.fake_quant_layer(layer, clips, qcfg))
    plain, _ = train_block_temp(512, 1408, 8, rank=16, samples=4, seqlen=32)
    assert plain > 3 * weights  # autodiff: Q(W) and its residuals for every linear at once
    assert frugal < 0.6 * plain, (frugal, plain)


def test_small_blocks_keep_the_quantized_weights(monkeypatch):
    """fake_quant_layer(on_use=True) keeps Q(W) for blocks of at most KEEP_QUANTIZED_MAX_ELEMENTS linear weights
    (the gradient above is the same either way); the kept residuals show in XLA's compiled memory."""
    from apiq_jax.calibration import blocks
    from tests.calibration.block_memory import train_block_temp

    cfg, w, _, _, clip = _case("asym", 24, 64, 16)
    layer = {"q_proj": w, "k_proj": w}
    clips = {"q_proj": clip, "k_proj": clip}
    assert all(v.keep_quantized for v in blocks.fake_quant_layer(layer, clips, cfg, on_use=True).values())
    monkeypatch.setattr(blocks, "KEEP_QUANTIZED_MAX_ELEMENTS", 2 * 24 * 64 - 1)  # one weight over the limit
    assert not any(v.keep_quantized for v in blocks.fake_quant_layer(layer, clips, cfg, on_use=True).values())
    frugal, weights = train_block_temp(256, 688, 4, rank=8, samples=4, seqlen=32)
    monkeypatch.setattr(blocks, "KEEP_QUANTIZED_MAX_ELEMENTS", 2**30)
    kept, _ = train_block_temp(256, 688, 4, rank=8, samples=4, seqlen=32)
    assert kept > frugal + weights  # Q(W) and the scale terms of every linear held from forward to backward
