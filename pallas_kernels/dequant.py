"""Dequantization of packed weight tiles: in-kernel (:func:`dequant_tile`, shared by all
kernels) and its pure-jnp reference on a whole prepared weight (:func:`dequantize_prepared`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.layout import PLANES, PreparedWeights


def unpack_plane(words: jax.Array, width: int) -> jax.Array:
    """Unpack the fields of packed words along rows (LSB first per word).

    Args:
      words: uint32 ``[R, C]``.
      width: bits per field (1, 2 or 4).
    Returns:
      int32 ``[R * 32 / width, C]``: row ``r * (32 / width) + j`` is field ``j`` of word row ``r``.
    """
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

    Args:
      planes: the tiles ``[bk * width / 32, bn]`` of each plane of ``PLANES[bits]``.
      scales: ``[g, 1, bn]`` for the ``g`` groups the tile spans (``g = 1`` when a group is
        longer than the tile).
      zeros: like ``scales``, or None for the constant ``zero_point``.
      bits: the code width. zero_point: the "sym" constant zero point (when ``zeros`` is None).
    Returns:
      float32 ``[bk, bn]``.
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
    """The dense float32 weight ``[N, K]`` of prepared weights (pure jnp: reference / XLA fallback).

    Args:
      w: weights from :func:`pallas_kernels.prepare_weights`.
    Returns:
      float32 ``[w.n, w.k]``, equal to the storage layout's dequantized weight.
    """
    zeros = None if w.zeros is None else w.zeros[:, 0, :]
    scales = w.scales[:, 0, :]
    # whole-K "tile": one group row per group along K
    dense = dequant_tile(list(w.planes), scales[:, None, :], None if zeros is None else zeros[:, None, :],
                         bits=w.bits, zero_point=w.zero_point)
    return dense[: w.k, : w.n].T

