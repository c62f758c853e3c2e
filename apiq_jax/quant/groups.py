"""Splitting the last axis into quantization groups (with padding) and back."""

from __future__ import annotations

import math

import jax.numpy as jnp


def num_groups(k: int, group_size: int) -> int:
    """Groups per row for a last axis of length ``k``.

    Args:
      k: the last axis length.
      group_size: elements per group.

    Returns:
      ``ceil(k / group_size)``.
    """
    return math.ceil(k / group_size)


def to_groups(w: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """``[..., K] -> [..., n_groups, group_size]``.

    When ``K`` is not a multiple of ``group_size`` the row is padded by repeating its
    last element, which never changes a group's min, max or absmax.

    Args:
      w: weights ``[..., K]``.
      group_size: elements per group.

    Returns:
      ``[..., n_groups, group_size]``.
    """
    k = w.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)], mode="edge")
    return w.reshape(*w.shape[:-1], -1, group_size)


def from_groups(g: jnp.ndarray, k: int) -> jnp.ndarray:
    """``[..., n_groups, group_size] -> [..., K]``, dropping the padding.

    Args:
      g: grouped values.
      k: the original last axis length.

    Returns:
      ``[..., K]``.
    """
    flat = g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])
    return flat[..., :k]
