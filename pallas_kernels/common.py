"""Plumbing shared by the GPU and TPU kernels: block specs of the packed weight, refs, precision.

The weight operands of every kernel are ``PreparedWeights.operands()``: the bit planes,
the scales, then the zero points when the scheme has them. A K block of ``bk`` codes
spans ``group_rows(bk, gs)`` rows of the ``[G, 1, N]`` constants: ``bk / gs`` whole
groups, or one row of a group longer than the block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.layout import PLANES, PreparedWeights


def dot_precision(dtype: Any) -> jax.lax.Precision | None:
    """The ``dot`` precision of the kernels for activations of ``dtype``.

    Args:
      dtype: the activations' dtype.
    Returns:
      ``HIGHEST`` for float32 (no TF32 / bf16 passes), None (the default) otherwise.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def group_rows(bk: int, gs: int) -> int:
    """Rows of the ``[G, 1, N]`` constants that one K block of ``bk`` codes spans.

    Args:
      bk: codes per K block. gs: codes per group.
    Returns:
      ``bk // gs`` when groups fit in the block, else 1.
    """
    return bk // gs if gs <= bk else 1


def group_block(kb: Any, bk: int, gs: int) -> Any:
    """Index, in blocks of :func:`group_rows` rows, of the constants of K block ``kb``.

    Args:
      kb: the K block index (int or traced int). bk: codes per K block. gs: codes per group.
    Returns:
      ``kb`` when groups fit in the block, else the group holding the block.
    """
    return kb if gs <= bk else kb // (gs // bk)


def weight_specs(w: PreparedWeights, bk: int, bn: int, kn: Callable[..., tuple[Any, Any]]) -> list[pl.BlockSpec]:
    """BlockSpecs of ``w.operands()`` for ``[bk, bn]`` weight tiles.

    Args:
      w: the prepared weights. bk, bn: the tile's K and N sizes.
      kn: maps the grid indices to the tile's ``(k block, n block)``.
    Returns:
      One spec per plane, then one per constant array (scales, zeros).
    """
    planes = [pl.BlockSpec((bk * width // 32, bn), lambda *idx: kn(*idx)) for width, _ in PLANES[w.bits]]
    rows, gs = group_rows(bk, w.group_size), w.group_size

    def const_index(*idx):
        kb, nb = kn(*idx)
        return group_block(kb, bk, gs), 0, nb

    const = pl.BlockSpec((rows, 1, bn), const_index)
    return planes + [const] * (1 if w.zeros is None else 2)


def split_refs(refs: Sequence[Any], w: PreparedWeights, n_scratch: int = 0) -> tuple[Any, list[Any], Any, Any, Any]:
    """Split a kernel's refs laid out as ``(lhs, *w.operands(), out, *scratch)``.

    Args:
      refs: the kernel's positional refs. w: the prepared weights (operand count).
      n_scratch: scratch refs after the output.
    Returns:
      ``(lhs_ref, plane_refs, scales_ref, zeros_ref or None, out_ref)``.
    """
    n_planes = len(w.planes)
    lhs, planes, s_ref = refs[0], list(refs[1 : 1 + n_planes]), refs[1 + n_planes]
    z_ref = refs[2 + n_planes] if w.zeros is not None else None
    return lhs, planes, s_ref, z_ref, refs[len(refs) - 1 - n_scratch]
