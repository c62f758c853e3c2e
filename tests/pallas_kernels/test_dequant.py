"""pallas_kernels.dequant: field unpacking and the whole-weight reference dequantization."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dequant import dequantize_prepared, unpack_plane
from tests.pallas_kernels.kernel_helpers import make


@pytest.mark.parametrize("width", [1, 2, 4])
def test_unpack_plane_is_lsb_first_along_rows(width):
    rng = np.random.default_rng(width)
    words = rng.integers(0, 2**32, (3, 5), dtype=np.uint64).astype(np.uint32)
    fields = np.asarray(unpack_plane(jnp.asarray(words), width))
    per = 32 // width
    assert fields.shape == (3 * per, 5) and fields.dtype == np.int32
    for r in range(3):
        for j in range(per):
            np.testing.assert_array_equal(fields[r * per + j], (words[r] >> (j * width)) & (2**width - 1))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scheme,gs", [("asym", 64), ("sym", 32), ("asym", 512)])
def test_dequantize_prepared_equals_storage_dequantize(bits, scheme, gs):
    _, prep, w = make(bits, scheme, 72, 600, gs=gs)
    dense = np.asarray(dequantize_prepared(prep))
    assert dense.shape == (72, 600) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, w)  # same float32 operations, so exact
