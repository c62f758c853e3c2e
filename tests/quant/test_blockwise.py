"""Textbook quantizers: absmax / zero-point INT8, block-wise, double quantization."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import (
    absmax_dequantize_int8,
    absmax_quantize_int8,
    blockwise_dequantize,
    blockwise_quantize,
    double_dequantize,
    double_quantize,
    nf_codebook,
    zeropoint_dequantize_int8,
    zeropoint_quantize_int8,
)


def test_absmax_int8_textbook_example():
    x = np.array([1.2, -0.5, -4.3, 1.2, -3.1, 0.8, 2.4, 5.4], np.float32)
    q, c = absmax_quantize_int8(jnp.asarray(x))
    np.testing.assert_array_equal(q, np.round(127 / 5.4 * x).astype(np.int8))
    assert int(q.max()) == 127
    np.testing.assert_allclose(absmax_dequantize_int8(q, c), x, atol=5.4 / 127 / 2 + 1e-6)


def test_zeropoint_int8_uses_full_range():
    x = np.random.default_rng(0).uniform(-1, 3, 1000).astype(np.float32)
    q, s, z = zeropoint_quantize_int8(jnp.asarray(x))
    assert int(q.min()) == -128 and int(q.max()) == 127
    np.testing.assert_allclose(zeropoint_dequantize_int8(q, s, z), x, atol=1 / float(s) + 1e-6)


@pytest.mark.parametrize("nf_bits", [None, 2, 3, 4])
def test_blockwise_round_trip_and_block_constants(nf_bits):
    x = np.random.default_rng(1).normal(size=(7, 45)).astype(np.float32)  # 315 = 4.9 blocks
    bq = blockwise_quantize(jnp.asarray(x), 64, nf_bits=nf_bits)
    assert bq.absmax.shape == (5,)
    np.testing.assert_allclose(bq.absmax, [np.abs(b).max() for b in np.array_split(x.ravel(), range(64, 315, 64))], rtol=1e-6)
    back = np.asarray(blockwise_dequantize(bq))
    assert back.shape == x.shape
    absmax = np.repeat(np.asarray(bq.absmax), 64)[: x.size].reshape(x.shape)
    if nf_bits is None:
        assert np.all(np.abs(back - x) <= absmax / 127 / 2 + 1e-6)
    else:
        book = nf_codebook(nf_bits)
        half_gap = np.diff(book).max() / 2
        assert np.all(np.abs(back - x) <= absmax * half_gap + 1e-6)


def test_double_quantization_error_and_size():
    c = np.random.default_rng(2).gamma(2.0, 0.01, size=4096).astype(np.float32)  # positive constants
    dq = double_quantize(jnp.asarray(c), 256)
    assert dq.codes.size * 32 == 8 * 4096 and dq.absmax.shape == (16,)
    back = np.asarray(double_dequantize(dq))
    dev = np.abs(c - c.mean()).reshape(16, 256).max(1)
    assert np.all(np.abs(back - c).reshape(16, 256) <= dev[:, None] / 127 / 2 + 1e-7)
