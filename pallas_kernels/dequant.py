"""In-kernel dequantization of one weight tile (value level, shared by all kernels)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.layout import PLANES, PreparedWeights


def unpack_plane(words: jax.Array, width: int) -> jax.Array:
    """uint32 words ``[R, C]`` -> int32 fields ``[R * 32 / width, C]`` (LSB first per word)."""
    per = 32 // width
    rows, cols = words.shape
    shifts = jax.lax.broadcasted_iota(jnp.uint32, (rows, per, cols), 1) * jnp.uint32(width)
    fields = (jnp.broadcast_to(words[:, None, :], (rows, per, cols)) >> shifts) & jnp.uint32(2**width - 1)
    return fields.reshape(rows * per, cols).astype(jnp.int32)


def dequant_tile(
    planes: Sequence[jax.Array],
    scales: jax.Array,
    zeros: jax.Array | None,
    *,
    bits: int,
    zero_point: int | None,
) -> jax.Array:
    """Float32 weight tile ``[bk, bn]`` = ``(q - z) * s`` from packed plane tiles.

    ``planes`` are the tiles ``[bk * width / 32, bn]`` of each plane of ``PLANES[bits]``;
    ``scales``/``zeros`` are ``[g, 1, bn]`` for the ``g`` groups the tile spans (``g = 1``
    when a group is longer than the tile); ``zeros`` None means the constant ``zero_point``.
    """
    q = None
    for words, (width, shift) in zip(planes, PLANES[bits]):
        f = unpack_plane(words, width)
        f = f << shift if shift else f
        q = f if q is None else q | f
    bk, bn = q.shape
    g = scales.shape[0]
    qf = q.astype(jnp.float32).reshape(g, bk // g, bn)
    z = jnp.float32(zero_point) if zeros is None else zeros
    return ((qf - z) * scales).reshape(bk, bn)


def dequantize_prepared(w: PreparedWeights) -> jax.Array:
    """The dense float32 weight ``[N, K]`` of prepared weights (reference / XLA fallback)."""
    zeros = None if w.zeros is None else w.zeros[:, 0, :]
    scales = w.scales[:, 0, :]
    # whole-K "tile": one group row per group along K
    dense = dequant_tile(list(w.planes), scales[:, None, :], None if zeros is None else zeros[:, None, :],
                         bits=w.bits, zero_point=w.zero_point)
    return dense[: w.k, : w.n].T

