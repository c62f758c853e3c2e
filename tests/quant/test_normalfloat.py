"""NormalFloat codebooks (QLoRA): the NF4 table, exact zero and unit range, nearest-level search."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import (
    NF4_QLORA,
    QuantConfig,
    dequantize,
    fake_quantize,
    nf_codebook,
    quantize,
)


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
