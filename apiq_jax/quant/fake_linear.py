"""A linear weight fake-quantized where it is used, for training its clipping logits.

:class:`FakeQuantWeight` holds a dense weight and its :class:`~apiq_jax.quant.ClipLogits`;
:func:`apiq_jax.models.llama.linear` multiplies by it through :func:`fake_quant_matmul`.

Why: training a block's clipping logits (ApiQ) differentiates ``x @ Q(W; clip)^T`` through
the quantizer. As plain autodiff, every linear keeps ``Q(W)`` and a weight-sized quotient
from the forward pass to the backward pass, and the backward pass builds four or five more
weight-sized arrays per linear (masks, broadcasts, products): about 4.4 float32 copies of a
block's weights at once (960 MB for a 2048-wide block with mlp 5632). Here the backward
pass keeps only ``x``, ``W`` and the logits and, one linear at a time, recomputes ``Q(W)``
and reduces ``dQ = g^T x`` to the per-group scale gradient in one pass::

    w_hat = a * s,   a = clip(round_ste(w / s) + z, 0, qmax) - z   (asym/sym; nf: a = book[code])
    dL/ds = sum over the group of dQ * (a - inside * w / s)           (inside: the code is not clipped;
                                                                        nf: inside everywhere s != 0)

then takes the logits' gradient from ``s(clip)`` by autodiff on per-group arrays. The
weight itself is a constant here (ApiQ never trains it): no gradient reaches ``w``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.quant.clip import ClipLogits
from apiq_jax.quant.config import QuantConfig
from apiq_jax.quant.groups import num_groups, to_groups
from apiq_jax.quant.normalfloat import nf_codebook
from apiq_jax.quant.ste import round_ste
from apiq_jax.quant.uniform import fake_quantize, group_codes, group_params, true_divide

__all__ = ["FakeQuantWeight", "depend_on", "fake_quant_matmul"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQuantWeight:
    """A dense ``[out, in]`` weight with its clipping logits, fake-quantized by the product that uses it.

    Attributes:
      w: the dense weight ``[out, in]`` (a constant: gradients reach the logits only).
      clip: its :class:`~apiq_jax.quant.ClipLogits`.
      config: the quantizer (static).
      keep_quantized: keep ``Q(W)`` and its scale-gradient terms from the forward pass for
        the backward pass instead of recomputing them (static; see :func:`fake_quant_matmul`).
    """

    w: jnp.ndarray
    clip: ClipLogits
    config: QuantConfig = dataclasses.field(metadata=dict(static=True))
    keep_quantized: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape ``(out, in)``."""
        return tuple(self.w.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The weight's dtype."""
        return self.w.dtype


def _codes_and_params(w: jnp.ndarray, clip: ClipLogits, config: QuantConfig):
    groups = to_groups(w.astype(jnp.float32), config.resolve_group_size(w.shape[-1]))
    params = group_params(groups, config, clip)
    return groups, params


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quant_matmul(x: jnp.ndarray, w: jnp.ndarray, clip: ClipLogits, config: QuantConfig,
                      keep_quantized: bool = False) -> jnp.ndarray:
    """``x [m, in] @ fake_quantize(w, config, clip=clip)^T`` with a memory-frugal gradient for ``clip``.

    Args:
      x: activations ``[m, in]`` (float32).
      w: the dense weight ``[out, in]``; treated as a constant (its cotangent is zero).
      clip: its clipping logits (gradients: those of autodiff through
        :func:`~apiq_jax.quant.fake_quantize`).
      config: the quantizer.
      keep_quantized: False (frugal): the backward pass recomputes ``Q(W)`` and the
        scale-gradient terms, holding only ``x``, ``W`` and the logits in between. True: the
        forward pass keeps both (two weight-sized float32 residuals per linear) and the
        backward pass reuses them: faster where the weights are small
        (:data:`~apiq_jax.calibration.blocks.KEEP_QUANTIZED_MAX_ELEMENTS`). The same values.

    Returns:
      ``[m, out]`` float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from apiq_jax.quant import QuantConfig, init_clip
      >>> cfg = QuantConfig(bits=2, group_size=8)
      >>> w, x = jax.random.normal(jax.random.key(0), (4, 16)), jnp.ones((3, 16))
      >>> clip = init_clip(w.shape, cfg)
      >>> bool(jnp.allclose(fake_quant_matmul(x, w, clip, cfg), x @ fake_quantize(w, cfg, clip=clip).T))
      True
    """
    return x @ fake_quantize(w, config, clip=clip).T


def depend_on(tree: Any, t: Any) -> Any:
    """``tree`` unchanged, but computed from ``t``: whatever is derived from it waits for ``t``.

    XLA's CPU scheduler otherwise computes what depends on parameters alone as early as it
    likes: every linear's ``Q(W)`` at the start of the pass, all alive at once, or a whole
    activation cache converted to float32 ahead of the loop that slices it. Optimization
    barriers do not order that (they become control dependencies this scheduler ignores).
    Adding ``0 * finite(first element of t)`` is a data dependency that no simplifier removes
    (``0 * x`` is not folded for floats) and leaves ``tree`` bit for bit.

    Args:
      tree: a pytree of floating arrays (best small, or consumed by one fusion: it is copied
        where XLA does not fuse the addition).
      t: any array or pytree of arrays (its first leaf's first element is read).

    Returns:
      ``tree``, equal bit for bit.

    Example:
      >>> import jax.numpy as jnp
      >>> depend_on({"a": jnp.ones(2)}, jnp.full(3, jnp.inf))["a"].tolist()
      [1.0, 1.0]
    """
    first = jax.tree.leaves(t)[0].reshape(-1)[0].astype(jnp.float32)
    zero = 0.0 * jnp.where(jnp.isfinite(first), first, 0.0)
    return jax.tree.map(lambda c: c + zero.astype(c.dtype), tree)


def _fwd(x, w, clip, config, keep_quantized):
    if keep_quantized:
        wq = fake_quantize(w, config, clip=clip)
        return x @ wq.T, (x, w, clip, wq, _dscale_terms(w, clip, config))
    return x @ fake_quantize(w, config, clip=depend_on(clip, x)).T, (x, w, clip, None, None)


def _dscale_terms(w: jnp.ndarray, clip: ClipLogits, config: QuantConfig) -> jnp.ndarray:
    """``d w_hat / d s`` per element of the groups of ``w`` (``[..., n_groups, gs]``)."""
    groups, params = _codes_and_params(w, clip, config)
    scale = params.scale
    if config.scheme == "nf":  # w_hat = (book[code] + v - sg(v)) * s, v = w / s (s == 0: v = w)
        a = jnp.asarray(nf_codebook(config.bits))[group_codes(groups, params, config).astype(jnp.int32)]
        return a - jnp.where(scale == 0, 0.0, true_divide(groups, jnp.where(scale == 0, 1.0, scale)))
    # w_hat = (clip(round_ste(u) + z, 0, qmax) - z) * s, u = w / s; the clip passes its bounds
    u = true_divide(groups, scale)
    unclipped = round_ste(u) + params.zero
    a = jnp.clip(unclipped, 0.0, float(config.qmax)) - params.zero
    return a - jnp.where((unclipped >= 0.0) & (unclipped <= float(config.qmax)), u, 0.0)


def _bwd(config, keep_quantized, res, g):
    x, w, clip, wq, terms = res
    k = w.shape[-1]
    gs = config.resolve_group_size(k)
    if keep_quantized:
        dx, clip2 = g @ wq, clip
    else:
        # each recomputation waits for this linear's cotangent, and the two are kept apart (XLA
        # then fuses each into one pass instead of materialising what they share)
        dx = g @ fake_quantize(w, config, clip=depend_on(clip, g))
        clip2 = depend_on(clip, dx)
        terms = _dscale_terms(w, clip2, config)
    dq = (g.T @ x).astype(jnp.float32)
    pad = num_groups(k, gs) * gs - k
    dq = jnp.pad(dq, [(0, 0), (0, pad)]).reshape(*dq.shape[:-1], -1, gs)  # padded columns get no gradient
    ds = jnp.sum(dq * terms, axis=-1, keepdims=True)
    _, scale_vjp = jax.vjp(lambda c: _codes_and_params(w, c, config)[1].scale, clip2)
    (dclip,) = scale_vjp(ds)
    return dx.astype(x.dtype), jnp.zeros_like(w), dclip


fake_quant_matmul.defvjp(_fwd, _bwd)
