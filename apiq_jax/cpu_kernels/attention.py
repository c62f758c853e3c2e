"""Fused causal attention for the CPU: one XLA custom call forward, one backward.

On the CPU backend XLA runs attention as a dozen fusions per query block (two batched dots, the
masked softmax, slices of the keys, transposes into and out of head-major layout), which made the
finetuning step slower than PyTorch's flash-attention kernel (``docs/speed.md``). The C++ kernel
in ``attention.cc`` reads ``q [b, s, kvh, g, hd]``, ``k, v [b, s, kvh, hd]`` where the
projections leave them, computes each tile's scores, softmax and product with the values in
cache, skips the keys after each query (causal masks only), and keeps only the output and each
query's log-sum-exp for the backward pass, which recomputes the probabilities (memory
``O(s)`` per head instead of ``O(s^2)``). Work is split over (batch, key head) pairs with
OpenMP.

It is built on first use (:mod:`apiq_jax.cpu_kernels.build`); where that is impossible (no C++
compiler) :func:`unavailable_reason` says why and the model keeps its XLA attention.
``APIQ_JAX_CPU_ATTENTION=0`` turns the kernel off.

Example:
    >>> import jax.numpy as jnp
    >>> from apiq_jax.cpu_kernels import attention
    >>> q = jnp.ones((1, 4, 1, 2, 16)); k = v = jnp.ones((1, 4, 1, 16))
    >>> mask = jnp.tril(jnp.ones((1, 4, 4), bool))
    >>> attention.supports(q, k, mask) and bool(jnp.allclose(attention.fused_attention(q, k, v, mask), 1.0))
    True
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.cpu_kernels.build import BuildError, load_library

#: the kernel's head_dim is a multiple of this (its vector width in float32 lanes); others are zero-padded
HEAD_DIM_MULTIPLE = 16
#: the custom-call targets registered for the CPU platform
FORWARD_TARGET, BACKWARD_TARGET = "apiq_cpu_attention_fwd", "apiq_cpu_attention_bwd"
#: set to "0" to keep XLA's attention on the CPU
ENV_SWITCH = "APIQ_JAX_CPU_ATTENTION"


@functools.cache
def _register() -> str | None:
    """Build, load and register the kernel once per process; the reason it is unavailable, or None."""
    try:
        lib = load_library("attention.cc")
    except BuildError as e:
        return str(e)
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.ApiqAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.ApiqAttentionBackward), platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """Why the fused kernel cannot run in this process, or None when it can.

    Returns:
      None on a CPU default backend with the kernel built; else a one-line reason (switched
      off by ``APIQ_JAX_CPU_ATTENTION=0``, another backend, or the build error).
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"turned off by {ENV_SWITCH}=0"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    return _register()


def supports(q: jax.Array, k: jax.Array, mask: jax.Array) -> bool:
    """Whether :func:`fused_attention` takes these operands (and the kernel is available).

    Args:
      q: queries ``[b, s, kvh, g, hd]``.
      k: keys ``[b, s, kvh, hd]`` (the same ``s``: self-attention without a cache).
      mask: boolean ``[1 or b, s, s]``.

    Returns:
      True for float32 operands of matching shapes and the kernel available
      (:func:`unavailable_reason`).
    """
    if q.ndim != 5 or k.ndim != 4 or mask.ndim != 3:
        return False
    b, s, kvh, _, hd = q.shape
    shapes_ok = k.shape == (b, s, kvh, hd) and mask.shape[1:] == (s, s) and mask.shape[0] in (1, b)
    dtypes_ok = q.dtype == jnp.float32 and k.dtype == jnp.float32
    return shapes_ok and dtypes_ok and unavailable_reason() is None


def _forward_call(q, k, v, mask, scale):
    b, s, kvh, g, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, kvh, g, s), jnp.float32))
    return jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")(
        q, k, v, mask.astype(bool), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, mask, scale):
    return _forward_call(q, k, v, mask, scale)[0]


def _fused_fwd(q, k, v, mask, scale):
    out, lse = _forward_call(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _fused_bwd(scale, res, dout):
    q, k, v, mask, out, lse = res
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")(
        q, k, v, mask.astype(bool), out, lse, dout.astype(jnp.float32), scale=np.float32(scale))
    return dq, dk, dv, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Causal softmax attention of ``q`` over ``k, v`` in one custom call (differentiable).

    Args:
      q: float32 queries ``[b, s, kvh, g, hd]`` (``g`` query heads per key head; ``hd`` is
        zero-padded to a multiple of :data:`HEAD_DIM_MULTIPLE` for the kernel).
      k, v: float32 keys and values ``[b, s, kvh, hd]``.
      mask: boolean ``[1 or b, s, s]``, True where a query may see a key; causal (keys after
        a query are never read). A query whose keys are all masked gets the mean of the values
        ``0..i`` and no gradient through the scores.

    Returns:
      ``[b, s, kvh, g, hd]`` float32: ``softmax(q k^T / sqrt(hd) + mask) v`` per head.

    Raises:
      ValueError: operands :func:`supports` refuses (with the reason the kernel is unavailable, if it is).
    """
    if not supports(q, k, mask):
        why = unavailable_reason()
        raise ValueError(
            f"fused CPU attention takes float32 q [b, s, kvh, g, hd], k, v [b, s, kvh, hd] and a bool mask "
            f"[1 or b, s, s]; got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, mask {mask.shape}"
            + (f" (kernel unavailable: {why})" if why else ""))
    hd = q.shape[-1]
    pad = -hd % HEAD_DIM_MULTIPLE  # zero lanes change no score and are cut from the output
    if pad:
        q, k, v = (jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) for x in (q, k, v))
    out = _fused(q, k, v, mask, float(hd) ** -0.5)
    return out[..., :hd] if pad else out


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """What :func:`fused_attention` computes, in plain ``jax.numpy`` (all scores at once).

    Args:
      q, k, v, mask: as :func:`fused_attention` (any float dtype; computed in float32).

    Returns:
      ``[b, s, kvh, g, hd]`` float32.
    """
    s, hd = q.shape[1], q.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    visible = jnp.logical_and(mask.astype(bool), causal)  # [mb, q, s]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(jnp.float32), k.astype(jnp.float32)) * hd**-0.5
    vis = visible[:, None, None]
    probs = jax.nn.softmax(jnp.where(vis, scores, -jnp.inf), axis=-1)
    dead = ~jnp.any(vis, axis=-1, keepdims=True)  # all keys masked: the mean of the values 0..i
    uniform = causal / jnp.arange(1, s + 1, dtype=jnp.float32)[:, None]
    probs = jnp.where(dead, uniform, jnp.nan_to_num(probs))
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
