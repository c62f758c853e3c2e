"""Faithfulness: the official ApiQ UniformAffineQuantizer (shared/golden/quantizer.npz).

Tolerances: forward values and codes must agree to float32 rounding (<= 1 ulp of the
weights' scale, 1e-7 absolute for weights ~0.02); gradients, which sum 64 products
through the scale path, within 1e-5 absolute (they are O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import ClipLogits, QuantConfig, dequantize, fake_quantize, quantize
from tests.conftest import require_shared

CASES = [f"b{b}_{s}_{i}" for b in (2, 3, 4) for s in ("asym", "sym") for i in ("init", "random")]


@pytest.fixture(scope="module")
def golden():
    path = require_shared("golden", "quantizer.npz")
    return dict(np.load(path))


def _case(golden, name):
    bits, scheme = int(name[1]), name.split("_")[1]
    cfg = QuantConfig(bits=bits, group_size=64, scheme=scheme, scale_dtype="float32")
    clip = ClipLogits(
        jnp.asarray(golden[f"{name}/up_logits"]).reshape(48, 2),
        jnp.asarray(golden[f"{name}/low_logits"]).reshape(48, 2),
    )
    return cfg, clip


@pytest.mark.parametrize("name", CASES)
def test_forward_scale_zero_codes(golden, name):
    cfg, clip = _case(golden, name)
    w = jnp.asarray(golden["W"])
    w_hat = fake_quantize(w, cfg, clip=clip)
    np.testing.assert_allclose(w_hat, golden[f"{name}/W_hat"], rtol=0, atol=1e-7)
    qt = quantize(w, cfg, clip=clip)
    np.testing.assert_array_equal(np.asarray(qt.unpacked_codes()).reshape(-1, 64), golden[f"{name}/codes"])
    np.testing.assert_allclose(np.asarray(qt.dense_scales()).reshape(-1, 1), golden[f"{name}/scale"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qt.dense_zeros()).reshape(-1, 1), golden[f"{name}/round_zero_point"])
    # The stored form reproduces the simulated one bit for bit.
    np.testing.assert_array_equal(dequantize(qt), w_hat)


@pytest.mark.parametrize("name", CASES)
def test_straight_through_gradients(golden, name):
    cfg, clip = _case(golden, name)
    w, g = jnp.asarray(golden["W"]), jnp.asarray(golden["G"])

    def objective(w, clip):
        return jnp.sum(fake_quantize(w, cfg, clip=clip) * g)

    grad_w, grad_clip = jax.grad(objective, argnums=(0, 1))(w, clip)
    grad_up, grad_low = grad_clip.gamma, grad_clip.beta
    np.testing.assert_allclose(grad_w, golden[f"{name}/grad_W"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(grad_up.reshape(-1, 1), golden[f"{name}/grad_up"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_low.reshape(-1, 1), golden[f"{name}/grad_low"], rtol=0, atol=1e-6)


def test_fixed_scale_gradient_uses_inclusive_clamp(golden):
    """With scale and zero point detached only STE + clamp remain: G where 0<=v<=3 (boundaries in)."""
    cfg, clip = _case(golden, "b2_asym_init")
    w, g = jnp.asarray(golden["W"]), jnp.asarray(golden["G"])
    from apiq_jax.quant import clip_inclusive, group_params, round_ste, to_groups

    params = jax.tree.map(jax.lax.stop_gradient, group_params(to_groups(w, 64), cfg, clip))

    def objective(w):
        v = round_ste(to_groups(w, 64) / params.scale) + params.zero
        w_hat = (clip_inclusive(v, 0.0, 3.0) - params.zero) * params.scale
        return jnp.sum(w_hat.reshape(w.shape) * g)

    grad = jax.grad(objective)(w)
    np.testing.assert_allclose(grad, golden["b2_asym_init/grad_W_fixed_scale"], rtol=0, atol=1e-6)
    # And the boundary count matters: the golden data has many values exactly on 0 or 3.
    v = np.round(np.asarray(to_groups(w, 64) / params.scale)) + np.asarray(params.zero)
    assert ((v == 0) | (v == 3)).sum() > 1000


@pytest.mark.parametrize("name", ["b2_asym_random", "b3_sym_random", "b4_asym_init"])
def test_jit_compiled_quantizer_is_bit_identical(golden, name):
    """Under jit XLA would turn w / broadcast(s) into w * (1/s); the quantizer must not drift."""
    cfg, clip = _case(golden, name)
    w = jnp.asarray(golden["W"])
    w_hat = jax.jit(lambda w, c: fake_quantize(w, cfg, clip=c))(w, clip)
    # sigmoid may differ by 1 ulp between fused and eager code; the codes may not differ.
    np.testing.assert_allclose(w_hat, fake_quantize(w, cfg, clip=clip), rtol=3e-7, atol=0)
    codes = jax.jit(lambda w, c: quantize(w, cfg, clip=c).unpacked_codes())(w, clip)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 64), golden[f"{name}/codes"])


def test_jit_matches_float32_numpy_on_a_large_matrix():
    """1M weights: every scale, zero point and code equals a float32 numpy evaluation."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (1024, 1024)).astype(np.float32)
    cfg = QuantConfig(bits=2, group_size=64, scale_dtype="float32")
    g = w.reshape(1024, -1, 64)
    xmax, xmin = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
    s = np.clip((xmax - xmin) / np.float32(3), 1e-5, 1e4)
    z = np.round(np.clip(-xmin / s, -1e4, 1e4))
    q = np.clip(np.round(g / s) + z, 0, 3)
    got = jax.jit(lambda w: quantize(w, cfg).unpacked_codes())(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(got).reshape(q.shape), q)
