"""Bit packing: exact round trips, the documented layout, and bad input."""

from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from apiq_jax.quant import pack_codes, unpack_codes


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every run
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), rows=st.integers(1, 5), chunks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, rows, chunks, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, 32 * chunks))
    words = pack_codes(jnp.asarray(codes), bits)
    assert words.dtype == jnp.uint32 and words.shape == (rows, 32 * chunks * bits // 32)
    np.testing.assert_array_equal(unpack_codes(words, bits), codes)


def _reference_layout(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent numpy writer of the documented layout (python ints, one code at a time)."""
    out = []
    for row in codes:
        words = []
        if bits == 3:
            for c0 in range(0, len(row), 32):
                chunk = [int(v) for v in row[c0 : c0 + 32]]
                w0 = sum((v & 3) << (2 * j) for j, v in enumerate(chunk[:16]))
                w1 = sum((v & 3) << (2 * j) for j, v in enumerate(chunk[16:]))
                w2 = sum(((v >> 2) & 1) << j for j, v in enumerate(chunk))
                words += [w0, w1, w2]
        else:
            per = 32 // bits
            for w0 in range(0, len(row), per):
                words.append(sum(int(v) << (bits * j) for j, v in enumerate(row[w0 : w0 + per])))
        out.append(words)
    return np.asarray(out, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_documentation(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 96))
    np.testing.assert_array_equal(np.asarray(pack_codes(jnp.asarray(codes), bits)), _reference_layout(codes, bits))


def test_storage_is_exactly_bits_per_code():
    for bits in (2, 3, 4, 8):
        assert pack_codes(jnp.zeros((1, 64), jnp.int32), bits).size * 32 == 64 * bits


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(jnp.zeros((2, 33), jnp.int32), 2)
    with pytest.raises(ValueError, match="bits=5"):
        pack_codes(jnp.zeros((2, 32), jnp.int32), 5)
    with pytest.raises(ValueError, match="uint32"):
        unpack_codes(jnp.zeros((2, 2), jnp.int32), 2)
