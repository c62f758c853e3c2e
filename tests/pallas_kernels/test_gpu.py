"""pallas_kernels.gpu (Triton kernels) vs dequantize-then-matmul (CPU, interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import qmatmul
from tests.pallas_kernels.kernel_helpers import SHAPES, make, ref_matmul, xs


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gpu_kernel_float32_matches_dequantized(bits, scheme, m, n, k):
    _, prep, w = make(bits, scheme, n, k)
    x = xs(m, k)
    y = qmatmul(x, prep, platform="gpu", interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,m", [(2, 1), (3, 64), (4, 5)])
def test_gpu_kernel_bfloat16_matches_dequantized(bits, m):
    _, prep, w = make(bits, "asym", 200, 172)
    x = xs(m, 172, jnp.bfloat16)
    y = np.asarray(qmatmul(x, prep, platform="gpu", interpret=True))
    ref = ref_matmul(x, w)  # same bf16 operands, so only accumulation order differs
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("gs,k", [(32, 160), (128, 300), (512, 1024)])
def test_other_group_sizes(gs, k):
    """Groups shorter than, equal to and longer than the K block (512 > block_k)."""
    _, prep, w = make(4, "asym", 130, k, gs=gs)
    for m in (3, 40):  # small and large variants (different block_k)
        x = xs(m, k)
        y = qmatmul(x, prep, platform="gpu", interpret=True)
        np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bits,scheme,m", [(2, "asym", 1), (3, "sym", 64), (4, "asym", 5)])
def test_gpu_grad_wrt_x_matches_reference(bits, scheme, m):
    _, prep, w = make(bits, scheme, 200, 172)
    x, r = xs(m, 172), xs(m, 200, seed=3)
    loss = lambda x: jnp.sum(qmatmul(x, prep, platform="gpu", interpret=True) * r)  # noqa: E731
    ref = lambda x: jnp.sum((x @ jnp.asarray(w).T) * r)  # noqa: E731
    dx = jax.jit(jax.grad(loss))(x)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jax.grad(ref)(x)), rtol=1e-5, atol=1e-4)


def test_one_hot_rows_read_single_weight_columns():
    _, prep, w = make(3, "asym", 200, 172)
    eye = jnp.eye(172, dtype=jnp.float32)[jnp.array([0, 63, 64, 171])]
    cols = np.asarray(qmatmul(eye, prep, platform="gpu", interpret=True))
    np.testing.assert_array_equal(cols, w[:, [0, 63, 64, 171]].T)
