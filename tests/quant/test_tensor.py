"""QuantizedTensor: bits per parameter, double quantization, state dicts, input checks, from_codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import (
    QuantConfig,
    bits_per_param,
    dequantize,
    fake_quantize,
    from_codes,
    quantize,
)


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (QuantConfig(bits=2, group_size=64, scale_dtype="float16"), 2 + 32 / 64),
        (QuantConfig(bits=2, group_size=64, scheme="sym"), 2 + 16 / 64),
        (QuantConfig(bits=3, group_size=64, scheme="nf", scale_dtype="float32"), 3 + 32 / 64),
        (QuantConfig(bits=4, group_size=128, scale_dtype="bfloat16"), 4 + 32 / 128),
    ],
)
def test_bits_per_param_counts_every_stored_bit(cfg, expected):
    qt = quantize(jnp.ones((256, 512), jnp.float32) * jnp.arange(512) / 512, cfg)
    assert bits_per_param(qt) == pytest.approx(expected)


def test_double_quant_storage_and_error():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(0, 0.02, (512, 1024)), jnp.float32)
    plain = quantize(w, QuantConfig(bits=4, group_size=64, scheme="nf", scale_dtype="float32"))
    dq = quantize(w, QuantConfig(bits=4, group_size=64, scheme="nf", double_quant=True))
    # QLoRA's figure: 8/64 + 32/(64*256) = 0.127 bits of constants per weight.
    assert bits_per_param(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    err_plain = float(jnp.mean((dequantize(plain) - w) ** 2))
    err_dq = float(jnp.mean((dequantize(dq) - w) ** 2))
    assert err_dq < 1.02 * err_plain  # 8-bit constants cost at most a couple of percent
    # 2-bit asymmetric with double quantization stays under 2.2 bits per weight.
    dq2 = quantize(w, QuantConfig(bits=2, group_size=64, double_quant=True))
    assert bits_per_param(dq2) < 2.2
    assert float(jnp.mean((dequantize(dq2) - w) ** 2)) < 1.05 * float(
        jnp.mean((dequantize(quantize(w, QuantConfig(bits=2, scale_dtype="float32"))) - w) ** 2)
    )


def test_state_dict_round_trip():
    w = jnp.asarray(np.random.default_rng(7).normal(size=(32, 100)), jnp.float32)
    for cfg in (QuantConfig(bits=3), QuantConfig(bits=2, double_quant=True), QuantConfig(bits=4, scheme="nf")):
        qt = quantize(w, cfg)
        back = type(qt).from_state_dict(qt.to_state_dict(), qt.metadata())
        np.testing.assert_array_equal(dequantize(back), dequantize(qt))


def test_quantize_rejects_bad_weights():
    cfg = QuantConfig()
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones((2, 3, 64)), cfg)
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones((64,)), cfg)
    bad = np.ones((4, 64), np.float32)
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 5\)"):
        quantize(jnp.asarray(bad), cfg)
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        quantize(jnp.asarray(bad), cfg)
    with pytest.raises(ValueError, match=r"clip logits gamma have shape \(4, 3\); expected \(4, 1\)"):
        quantize(jnp.ones((4, 64)), cfg, clip=(jnp.zeros((4, 3)), jnp.zeros((4, 1))))
    with pytest.raises(ValueError, match="floating point"):
        fake_quantize(jnp.ones((4, 64), jnp.int32), cfg)


@pytest.mark.parametrize("scheme", ["asym", "sym", "nf"])
def test_from_codes_stores_what_quantize_stores(scheme):
    """quantize() lays its codes out through from_codes(): rebuilding from the codes gives the same tensor."""
    w = jnp.asarray(np.random.default_rng(5).normal(0, 0.02, (6, 100)), jnp.float32)
    cfg = QuantConfig(bits=3, group_size=32, scheme=scheme)
    qt = quantize(w, cfg)
    codes = qt.unpacked_codes()
    zeros = None if qt.zeros is None else qt.dense_zeros()
    again = from_codes(codes, qt.dense_scales(), zeros, qt.shape, cfg, jnp.float32)
    assert jax.tree.structure(again) == jax.tree.structure(qt)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(qt)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="double_quant=False"):
        from_codes(codes, qt.dense_scales(), zeros, qt.shape, QuantConfig(bits=3, group_size=32, double_quant=True),
                   jnp.float32)
