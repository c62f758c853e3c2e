"""Differentiable entry point: ``x @ W^T`` on prepared packed weights, with a custom VJP.

The forward runs the platform's Pallas kernel; the backward computes the input gradient
``dy @ W`` with the transposed kernel on the same packed weights and the same
:class:`~pallas_kernels.tuning.BlockSizes`. The weights are frozen: their cotangent is
None (symbolically zero), so integer codes never see a float cotangent and nothing in
the backward touches a dense weight. :func:`qmatmul_reference` is the pure-jnp
computation the kernels implement.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, tpu
from pallas_kernels.dequant import dequantize_prepared
from pallas_kernels.layout import PreparedWeights
from pallas_kernels.tuning import PLATFORMS, BlockSizes, block_sizes_for

_KERNELS = {"gpu": (gpu.matmul, gpu.matmul_dx), "tpu": (tpu.matmul, tpu.matmul_dx)}
X_DTYPES = ("float32", "bfloat16")


def _pad_rows_cols(a: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _forward(x: jax.Array, w: PreparedWeights, platform: str, interpret: bool, b: BlockSizes) -> jax.Array:
    m = x.shape[0]
    m_pad = -(-m // b.block_m) * b.block_m
    y = _KERNELS[platform][0](_pad_rows_cols(x, m_pad, w.k_pad), w, b, interpret=interpret)
    return y[:m, : w.n]


def _input_grad(
    dy: jax.Array, w: PreparedWeights, platform: str, interpret: bool, b: BlockSizes, dtype: str
) -> jax.Array:
    m = dy.shape[0]
    m_pad = -(-m // b.block_m) * b.block_m
    d = _pad_rows_cols(dy.astype(dtype), m_pad, w.n_pad)
    return _KERNELS[platform][1](d, w, b, interpret=interpret)[:m, : w.k].astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul(x: jax.Array, w: PreparedWeights, platform: str, interpret: bool, b: BlockSizes) -> jax.Array:
    return _forward(x, w, platform, interpret, b)


def _qmatmul_fwd(x, w, platform, interpret, b):
    # Zero-size residual carries x's dtype into the backward.
    return _forward(x, w, platform, interpret, b), (w, jnp.zeros((0,), x.dtype))


def _qmatmul_bwd(platform, interpret, b, res, dy):
    w, proto = res
    return _input_grad(dy, w, platform, interpret, b, proto.dtype.name), None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _check_x(x: jax.Array, w: PreparedWeights) -> None:
    if not isinstance(w, PreparedWeights):
        raise ValueError(f"w must be PreparedWeights from prepare_weights(), got {type(w).__name__}")
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {getattr(x, 'shape', None)}")
    if x.shape[1] != w.k:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight has K={w.k}; they must match")


def qmatmul(
    x: jax.Array,
    w: PreparedWeights,
    *,
    platform: str = "gpu",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x @ dequant(w)^T`` as float32 ``[M, N]`` with a Pallas kernel; differentiable in ``x``.

    Args:
      x: activations ``[M, K]`` in float32 or bfloat16 (``K == w.k``, ``M >= 1``).
      w: weights from :func:`pallas_kernels.prepare_weights`.
      platform: "gpu" (Triton kernel) or "tpu" (Mosaic kernel).
      interpret: run the kernel in Pallas' interpreter (CPU testing): the generic
        interpreter for "gpu", ``pltpu.InterpretParams()`` for "tpu".
      block_sizes: the tiles of this call (forward and backward); None for
        :func:`pallas_kernels.block_sizes_for` ``(platform, M)``. Numerics do not depend
        on them beyond float32 summation order.
    Returns:
      float32 ``[M, N]``; ``jax.grad`` with respect to ``x`` runs the transposed kernel
      and gives ``x``'s dtype; the weights get no gradient.
    Raises ValueError naming the offending value for unsupported input.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from pallas_kernels import BlockSizes, prepare_weights, qmatmul_reference
    >>> n, k = 8, 64
    >>> codes = jax.random.bits(jax.random.key(0), (n, k * 4 // 32), jnp.uint32)  # 4-bit codes
    >>> scales = jnp.full((n, k // 32), 0.1)
    >>> zeros = jnp.full((n, k // 32), 7)
    >>> w = prepare_weights(codes, scales, zeros, bits=4, k=k, group_size=32, scheme="asym")
    >>> x = jax.random.normal(jax.random.key(1), (2, k))
    >>> y = qmatmul(x, w, platform="gpu", interpret=True, block_sizes=BlockSizes(16, 32, 64))
    >>> y.shape, y.dtype
    ((2, 8), dtype('float32'))
    >>> bool(np.allclose(y, qmatmul_reference(x, w), rtol=1e-5, atol=1e-5))
    True
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not supported; accepted: {PLATFORMS}")
    _check_x(x, w)
    if jnp.dtype(x.dtype).name not in X_DTYPES:
        raise ValueError(f"x dtype {jnp.dtype(x.dtype).name} is not supported; accepted: {X_DTYPES}")
    if x.shape[0] == 0:
        raise ValueError("x has M=0 rows; accepted: M >= 1")
    if block_sizes is None:
        block_sizes = block_sizes_for(platform, x.shape[0])
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")
    return _qmatmul(x, w, platform, interpret, block_sizes.check(platform, w.bits))


def qmatmul_reference(
    x: jax.Array, w: PreparedWeights, *, precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
) -> jax.Array:
    """Pure-jnp :func:`qmatmul`: dequantize, round to ``x``'s dtype, float32 dot.

    The weight is rounded to ``x``'s dtype as the kernels round each dequantized tile,
    so for bfloat16 ``x`` only the accumulation order differs from the kernels.

    Args:
      x: activations ``[M, K]`` (any float dtype; ``K == w.k``).
      w: weights from :func:`pallas_kernels.prepare_weights`.
      precision: of the dot (default HIGHEST: no reduced-precision passes on GPU/TPU).
    Returns:
      float32 ``[M, N]``; differentiable in ``x`` by ordinary autodiff.
    """
    _check_x(x, w)
    dense = dequantize_prepared(w).astype(x.dtype)
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, dense, dims, precision=precision, preferred_element_type=jnp.float32)
