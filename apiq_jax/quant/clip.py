"""Learnable weight-clipping logits: the one type every quantizer and calibration method uses.

A weight ``[..., K]`` split into groups along ``K`` has one pair of logits per group; the
quantizer shrinks each group's range to ``[sigmoid(beta) min, sigmoid(gamma) max]``
(OmniQuant's learnable weight clipping, as ApiQ uses it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.quant.config import QuantConfig
from apiq_jax.quant.groups import num_groups

#: the clipping-logit value ApiQ starts from (sigmoid(4.0) = 0.982 of each group's range)
CLIP_INIT = 4.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipLogits:
    """Clipping logits of one weight, a pytree with two leaves.

    Attributes:
      gamma: logits of the upper bound ``[..., n_groups]``: ``xmax' = sigmoid(gamma) * max(group)``.
      beta: logits of the lower bound ``[..., n_groups]``: ``xmin' = sigmoid(beta) * min(group)``.

    It unpacks as ``gamma, beta = clip``. Gradients, optimizer states and checkpoints of a
    ``ClipLogits`` are ``ClipLogits`` too.
    """

    gamma: Any
    beta: Any

    def __iter__(self) -> Iterator[Any]:
        """Iterate ``gamma`` then ``beta`` (so ``gamma, beta = clip`` works).

        Returns:
          An iterator over the two logit arrays.
        """
        return iter((self.gamma, self.beta))


def clip_shape(shape: tuple[int, ...], cfg: QuantConfig) -> tuple[int, ...]:
    """Shape of each clipping-logit array for a weight of ``shape``.

    Args:
      shape: the weight's shape ``[..., K]``.
      cfg: the quantization config (its group size splits ``K``).

    Returns:
      ``shape[:-1] + (n_groups,)``.
    """
    return tuple(shape[:-1]) + (num_groups(shape[-1], cfg.resolve_group_size(shape[-1])),)


def init_clip(shape: tuple[int, ...], cfg: QuantConfig, value: float = CLIP_INIT) -> ClipLogits:
    """Clipping logits of a weight of ``shape`` with every logit equal to ``value``.

    Args:
      shape: the weight's shape ``[..., K]``.
      cfg: the quantization config.
      value: the initial logit (ApiQ: 4.0; a large value such as 20 is plain RTN).

    Returns:
      float32 :class:`ClipLogits` of shape :func:`clip_shape`.
    """
    s = clip_shape(shape, cfg)
    return ClipLogits(jnp.full(s, value, jnp.float32), jnp.full(s, value, jnp.float32))


def as_clip_logits(clip: Any) -> ClipLogits | None:
    """``clip`` as :class:`ClipLogits` (None stays None).

    Older callers pass a ``(gamma, beta)`` pair; it is accepted and converted here, the
    one place that knows about it.

    Args:
      clip: a :class:`ClipLogits`, a ``(gamma, beta)`` pair or None.

    Returns:
      The :class:`ClipLogits`, or None.

    Raises:
      ValueError: anything else.
    """
    if clip is None or isinstance(clip, ClipLogits):
        return clip
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        return ClipLogits(*clip)
    raise ValueError(f"clip must be an apiq_jax.quant.ClipLogits(gamma, beta) or None, got {type(clip).__name__}")
