"""pallas_kernels.tpu (Mosaic kernels) vs dequantize-then-matmul (CPU, TPU interpreter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, qmatmul, tpu
from tests.pallas_kernels.kernel_helpers import make, ref_matmul, xs


@pytest.mark.parametrize("bits,scheme,m", [(2, "asym", 5), (3, "sym", 20), (4, "asym", 1)])
def test_tpu_kernel_matches_dequantized_with_grad(bits, scheme, m):
    _, prep, w = make(bits, scheme, 200, 172)
    x = xs(m, 172)
    y = qmatmul(x, prep, platform="tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=1e-4)
    r = xs(m, 200, seed=3)
    dx = jax.grad(lambda x: jnp.sum(qmatmul(x, prep, platform="tpu", interpret=True) * r))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(r, np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_tpu_kernel_group_longer_than_block():
    _, prep, w = make(2, "sym", 128, 1024, gs=512)
    x = xs(4, 1024)
    y = qmatmul(x, prep, platform="tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bits,bk,lowers", [(2, 128, True), (3, 256, True), (3, 128, False)])
def test_mosaic_lowering_agrees_with_the_tpu_block_size_check(bits, bk, lowers):
    """BlockSizes.check("tpu", bits) refuses exactly the tiles Mosaic cannot lower."""
    _, prep, _ = make(bits, "asym", 128, 512)
    b = BlockSizes(8, 128, bk)
    lower = lambda: jax.jit(lambda x: tpu.matmul(x, prep, b)).trace(xs(8, 512)).lower(  # noqa: E731
        lowering_platforms=("tpu",))
    if lowers:
        b.check("tpu", bits)
        lower()
    else:
        with pytest.raises(ValueError, match="block_k=128 is not supported on TPU"):
            b.check("tpu", bits)
        with pytest.raises(Exception, match="divisible by 8 and 128"):
            lower()
