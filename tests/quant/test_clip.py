"""Clipping logits (apiq_jax/quant/clip.py): one typed pytree accepted by quantize and fake_quantize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import ClipLogits, QuantConfig, clip_shape, fake_quantize, init_clip, quantize
from apiq_jax.quant.clip import as_clip_logits


def test_clip_logits_shrink_the_range_and_get_gradients():
    w = jnp.asarray(np.random.default_rng(2).normal(0, 0.02, (4, 128)), jnp.float32)
    cfg = QuantConfig(bits=2, group_size=64, scheme="asym", scale_dtype="float32")
    clip = init_clip(w.shape, cfg, value=0.0)  # sigmoid(0) = 0.5: half the range
    s_half = quantize(w, cfg, clip=clip).dense_scales()
    s_full = quantize(w, cfg).dense_scales()
    np.testing.assert_allclose(s_half, 0.5 * s_full, rtol=1e-6)
    grads = jax.grad(lambda c: jnp.sum(fake_quantize(w, cfg, clip=c) ** 2))(clip)
    assert isinstance(grads, ClipLogits)  # gradients have the same type
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_init_shape_and_unpacking():
    cfg = QuantConfig(bits=2, group_size=32)
    clip = init_clip((6, 100), cfg)
    assert isinstance(clip, ClipLogits) and clip_shape((6, 100), cfg) == (6, 4)
    gamma, beta = clip  # unpacks as (gamma, beta)
    assert gamma.shape == beta.shape == (6, 4) and float(gamma[0, 0]) == 4.0
    assert len(jax.tree.leaves(clip)) == 2


def test_older_pairs_are_converted_in_one_place():
    w = jnp.asarray(np.random.default_rng(3).normal(0, 0.02, (6, 64)), jnp.float32)
    cfg = QuantConfig(bits=2, group_size=32)
    clip = init_clip(w.shape, cfg, 1.0)
    assert as_clip_logits(None) is None and as_clip_logits(clip) is clip
    pair = (clip.gamma, clip.beta)
    np.testing.assert_array_equal(np.asarray(fake_quantize(w, cfg, clip=pair)),
                                  np.asarray(fake_quantize(w, cfg, clip=clip)))
    np.testing.assert_array_equal(np.asarray(quantize(w, cfg, clip=pair).codes),
                                  np.asarray(quantize(w, cfg, clip=clip).codes))
    with pytest.raises(ValueError, match="ClipLogits"):
        quantize(w, cfg, clip={"gamma": clip.gamma, "beta": clip.beta})
    with pytest.raises(ValueError, match=r"clip logits beta have shape \(6, 3\); expected \(6, 2\)"):
        quantize(w, cfg, clip=ClipLogits(clip.gamma, jnp.zeros((6, 3))))
