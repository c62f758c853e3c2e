"""Properties of the group quantizer, QuantizedTensor storage and configuration errors.

Reference for the round-trip checks: an independent float64 numpy implementation of the
DESIGN.md formulas (RTN, no clipping logits).
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

from apiq_jax.quant import (
    NF4_QLORA,
    QuantConfig,
    bits_per_param,
    dequantize,
    fake_quantize,
    from_codes,
    nf_codebook,
    quantize,
)


def numpy_rtn(w: np.ndarray, bits: int, gs: int, scheme: str) -> np.ndarray:
    """float64 reference of asym/sym RTN with edge padding of the last group."""
    n, k = w.shape
    ng = math.ceil(k / gs)
    wp = np.concatenate([w, np.repeat(w[:, -1:], ng * gs - k, axis=1)], axis=1).reshape(n, ng, gs)
    wp = wp.astype(np.float64)
    xmax, xmin = wp.max(-1, keepdims=True), wp.min(-1, keepdims=True)
    qmax = 2**bits - 1
    if scheme == "asym":
        s = np.clip((xmax - xmin) / qmax, 1e-5, 1e4)
        z = np.round(np.clip(-xmin / s, -1e4, 1e4))
    else:
        s = np.clip(np.maximum(abs(xmax), abs(xmin)) / (2 ** (bits - 1) - 1), 1e-5, 1e4)
        z = np.full_like(s, 2 ** (bits - 1) - 1)
    q = np.clip(np.round(wp / s) + z, 0, qmax)
    return ((q - z) * s).reshape(n, -1)[:, :k]


@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples on every run
@example(bits=2, scheme="asym", gs=16, n=1, k=1, seed=3)  # a constant group beyond the zero-point clamp
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    scheme=st.sampled_from(["asym", "sym"]),
    gs=st.sampled_from([16, 32, 64, 128]),
    n=st.integers(1, 6),
    k=st.integers(1, 200),
    seed=st.integers(0, 1000),
)
def test_matches_float64_reference_and_error_bound(bits, scheme, gs, n, k, seed):
    w = np.random.default_rng(seed).normal(0, 0.05, size=(n, k)).astype(np.float32)
    cfg = QuantConfig(bits=bits, group_size=gs, scheme=scheme, scale_dtype="float32")
    w_hat = np.asarray(fake_quantize(jnp.asarray(w), cfg))
    ref = numpy_rtn(w, bits, gs, scheme)
    assert w_hat.shape == w.shape
    # float32 vs float64 could flip a code exactly at a rounding tie; in these (derandomized)
    # examples none does: every value agrees to 1e-6 (measured: all 26 examples, 100%)
    np.testing.assert_allclose(w_hat, ref, rtol=0, atol=1e-6)
    # Error bounded by half a step inside the representable range (RTN, no clipping). Outside
    # it lie groups whose zero point -min/scale exceeds the reference's clamp of 1e4: e.g. a
    # constant group (scale clamped to 1e-5) with |w| > 0.1 is, as in the reference, not
    # representable. hypothesis found that case (n = k = 1); it is excluded here on purpose.
    qt = quantize(jnp.asarray(w), cfg)
    step = np.repeat(np.asarray(qt.dense_scales()), qt.group_size, axis=1)[:, :k]
    if scheme == "asym":
        zero = np.repeat(np.asarray(qt.dense_zeros()), qt.group_size, axis=1)[:, :k]
        representable = np.abs(zero) < 1e4
        err = np.abs(w_hat - w)[representable]
        assert np.all(err <= (0.5 * step * (1 + 1e-4) + 1e-7)[representable])
    # Stored form equals the simulated form exactly, and re-quantizing is idempotent.
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), w_hat)
    again = np.asarray(fake_quantize(jnp.asarray(w_hat), cfg))
    np.testing.assert_allclose(again, w_hat, rtol=0, atol=1e-6)


def test_padding_never_changes_min_max():
    """K=172 (stories260K's MLP width) with group 64: the padded last group keeps its range."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 172)).astype(np.float32)
    w[:, 128:] += 5.0  # last (partial) group lives far from zero: zero padding would widen it
    cfg = QuantConfig(bits=2, group_size=64, scheme="asym", scale_dtype="float32")
    qt = quantize(jnp.asarray(w), cfg)
    last = w[:, 128:]
    np.testing.assert_allclose(np.asarray(qt.dense_scales())[:, 2], (last.max(1) - last.min(1)) / 3, rtol=1e-6)
    assert dequantize(qt).shape == (8, 172)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), numpy_rtn(w, 2, 64, "asym"), atol=1e-5)


def test_fp16_scales_are_simulated_exactly():
    w = jnp.asarray(np.random.default_rng(1).normal(0, 0.02, (16, 256)), jnp.float32)
    cfg = QuantConfig(bits=3, group_size=64, scheme="asym", scale_dtype="float16")
    qt = quantize(w, cfg)
    assert qt.scales.dtype == jnp.float16 and qt.zeros.dtype == jnp.int16
    np.testing.assert_array_equal(dequantize(qt), fake_quantize(w, cfg))


def test_jit_and_vmap():
    w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 16, 96)), jnp.float32)
    cfg = QuantConfig(bits=4, group_size=32, scheme="sym", scale_dtype="float32")
    stacked = jax.jit(jax.vmap(lambda x: quantize(x, cfg)))(w)
    assert stacked.codes.shape == (3, 16, 96 * 4 // 32)
    np.testing.assert_array_equal(jax.vmap(dequantize)(stacked), jax.vmap(lambda x: fake_quantize(x, cfg))(w))


def test_group_size_none_is_one_group_per_row():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(5, 70)), jnp.float32)
    qt = quantize(w, QuantConfig(bits=4, group_size=None, scale_dtype="float32"))
    assert qt.dense_scales().shape == (5, 1)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), numpy_rtn(np.asarray(w), 4, 70, "asym"), atol=1e-6)


# --- NormalFloat -------------------------------------------------------------------------


def test_nf4_equals_qlora_table():
    # Our probabilities are float32 (as peft's torch.linspace); bitsandbytes used float64,
    # which moves a level by at most 2 ulp (2.4e-7).
    np.testing.assert_allclose(nf_codebook(4), np.asarray(NF4_QLORA, np.float32), rtol=0, atol=3e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebooks_have_exact_zero_and_unit_range(bits):
    book = nf_codebook(bits)
    assert len(book) == 2**bits and book.min() == -1.0 and book.max() == 1.0 and 0.0 in book
    assert np.all(np.diff(book) > 0)


def test_nf_quantize_picks_nearest_level():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 128)).astype(np.float32)
    cfg = QuantConfig(bits=4, group_size=64, scheme="nf", scale_dtype="float32")
    qt = quantize(jnp.asarray(w), cfg)
    assert qt.zeros is None
    absmax = np.abs(w.reshape(6, 2, 64)).max(-1, keepdims=True)
    book = nf_codebook(4).astype(np.float64)
    idx = np.abs((w.reshape(6, 2, 64) / absmax)[..., None] - book).argmin(-1)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), (book[idx] * absmax).reshape(6, 128), atol=1e-6)
    np.testing.assert_array_equal(dequantize(qt), fake_quantize(jnp.asarray(w), cfg))


# --- storage accounting and double quantization ----------------------------------------


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


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=8, scheme="nf"), "bits=8"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=-64), "group_size=-64"),
        (dict(scheme="fp4"), "scheme='fp4'"),
        (dict(scale_dtype="int8"), "scale_dtype='int8'"),
    ],
)
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


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
