"""Differentiable entry point: ``x @ W^T`` on prepared packed weights, with a custom VJP.

The forward runs the platform's Pallas kernel; the backward computes the input gradient
``dy @ W`` with the transposed kernel on the same packed weights. The weights are
frozen: their cotangent is None (symbolically zero), so integer codes never see a
float cotangent and nothing in the backward touches a dense weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, tpu
from pallas_kernels.layout import PreparedWeights
from pallas_kernels.tuning import PLATFORMS, blocks_for

_KERNELS = {"gpu": (gpu.matmul, gpu.matmul_dx), "tpu": (tpu.matmul, tpu.matmul_dx)}
X_DTYPES = ("float32", "bfloat16")


def _pad_rows_cols(a: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _forward(x: jax.Array, w: PreparedWeights, platform: str, interpret: bool) -> jax.Array:
    m = x.shape[0]
    b = blocks_for(platform, m)
    m_pad = -(-m // b.block_m) * b.block_m
    y = _KERNELS[platform][0](_pad_rows_cols(x, m_pad, w.k_pad), w, b, interpret=interpret)
    return y[:m, : w.n]


def _input_grad(dy: jax.Array, w: PreparedWeights, platform: str, interpret: bool, dtype: str) -> jax.Array:
    m = dy.shape[0]
    b = blocks_for(platform, m)
    m_pad = -(-m // b.block_m) * b.block_m
    d = _pad_rows_cols(dy.astype(dtype), m_pad, w.n_pad)
    return _KERNELS[platform][1](d, w, b, interpret=interpret)[:m, : w.k].astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x: jax.Array, w: PreparedWeights, platform: str, interpret: bool) -> jax.Array:
    return _forward(x, w, platform, interpret)


def _qmatmul_fwd(x, w, platform, interpret):
    # Zero-size residual carries x's dtype into the backward.
    return _forward(x, w, platform, interpret), (w, jnp.zeros((0,), x.dtype))


def _qmatmul_bwd(platform, interpret, res, dy):
    w, proto = res
    return _input_grad(dy, w, platform, interpret, proto.dtype.name), None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul(x: jax.Array, w: PreparedWeights, *, platform: str = "gpu", interpret: bool = False) -> jax.Array:
    """``x @ dequant(w)^T`` as float32 ``[M, N]`` with a Pallas kernel; differentiable in ``x``.

    Args:
      x: activations ``[M, K]`` in float32 or bfloat16 (``K == w.k``).
      w: weights from :func:`pallas_kernels.prepare_weights`.
      platform: "gpu" (Triton kernel) or "tpu" (Mosaic kernel).
      interpret: run the kernel in Pallas' interpreter (CPU testing): the generic
        interpreter for "gpu", ``pltpu.InterpretParams()`` for "tpu".
    Raises ValueError naming the offending value for unsupported input.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not supported; accepted: {PLATFORMS}")
    if not isinstance(w, PreparedWeights):
        raise ValueError(f"w must be PreparedWeights from prepare_weights(), got {type(w).__name__}")
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {getattr(x, 'shape', None)}")
    if x.shape[1] != w.k:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight has K={w.k}; they must match")
    if jnp.dtype(x.dtype).name not in X_DTYPES:
        raise ValueError(f"x dtype {jnp.dtype(x.dtype).name} is not supported; accepted: {X_DTYPES}")
    if x.shape[0] == 0:
        raise ValueError("x has M=0 rows; accepted: M >= 1")
    return _qmatmul(x, w, platform, interpret)
