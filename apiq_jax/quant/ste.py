"""Straight-through estimators with the reference (PyTorch) gradient rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_ste(x: jnp.ndarray) -> jnp.ndarray:
    """Round half to even in the forward pass, identity in the backward pass.

    Written as ``stop_gradient(round(x) - x) + x`` in the same order as the reference
    ``(x.round() - x).detach() + x`` so the forward values agree bit for bit.

    Args:
      x: float values.

    Returns:
      The rounded values (gradient: identity).
    """
    return jax.lax.stop_gradient(jnp.round(x) - x) + x


@jax.custom_jvp
def clip_inclusive(x: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
    """``clip(x, lo, hi)`` whose gradient passes where ``lo <= x <= hi``, bounds included.

    This is ``torch.clamp``'s rule; ``jnp.clip`` differs at the boundaries. ``lo`` and
    ``hi`` receive no gradient.

    Args:
      x: values.
      lo, hi: the bounds.

    Returns:
      ``min(max(x, lo), hi)``.
    """
    return jnp.minimum(jnp.maximum(x, lo), hi)


@clip_inclusive.defjvp
def _clip_inclusive_jvp(primals, tangents):
    x, lo, hi = primals
    dx = tangents[0]
    out = clip_inclusive(x, lo, hi)
    inside = (x >= lo) & (x <= hi)
    return out, jnp.where(inside, dx, jnp.zeros_like(dx))
