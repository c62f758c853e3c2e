"""Group-wise fake quantization with learnable weight clipping (the ApiQ/OmniQuant quantizer).

All functions are pure, jit/vmap/grad-able, and follow the reference formulas exactly:

    xmax = sigmoid(gamma) * max(g)      xmin = sigmoid(beta) * min(g)
    asym: s = clip((xmax - xmin) / (2^b - 1), 1e-5, 1e4);  z = round(clip(-xmin / s, -1e4, 1e4))
    sym:  s = clip(max(|xmax|, |xmin|) / (2^(b-1) - 1), 1e-5, 1e4);  z = 2^(b-1) - 1
    q = clip(round_ste(w / s) + z, 0, 2^b - 1);   w_hat = (q - z) * s

The zero point gets no gradient; the code clip passes the gradient on its boundaries.
The "nf" scheme uses a NormalFloat codebook with per-group absmax (QLoRA), with a
straight-through estimator on the normalised weight.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from apiq_jax.quant.clip import ClipLogits, as_clip_logits, clip_shape
from apiq_jax.quant.config import QuantConfig
from apiq_jax.quant.groups import from_groups, to_groups
from apiq_jax.quant.normalfloat import nf_codebook
from apiq_jax.quant.ste import clip_inclusive, round_ste

SCALE_MIN = 1e-5
SCALE_MAX = 1e4
ZERO_LIMIT = 1e4



class GroupParams(NamedTuple):
    """Per-group quantization constants, shape ``[..., n_groups, 1]`` (float32)."""

    scale: jnp.ndarray
    zero: jnp.ndarray


def _check_weight(w: jnp.ndarray, cfg: QuantConfig, clip: ClipLogits | None) -> None:
    if w.ndim < 1:
        raise ValueError(f"weight must have at least one axis, got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight dtype must be floating point, got {w.dtype}")
    if clip is not None:
        want = clip_shape(w.shape, cfg)
        for name, c in (("gamma", clip.gamma), ("beta", clip.beta)):
            if tuple(c.shape) != want:
                raise ValueError(
                    f"clip logits {name} have shape {tuple(c.shape)}; expected {want} "
                    f"(weight shape {tuple(w.shape)}, group_size {cfg.group_size})"
                )


def true_divide(x: jnp.ndarray, d) -> jnp.ndarray:
    """``x / d`` as an IEEE division per element, also under jit.

    XLA's algebraic simplifier rewrites ``x / broadcast(d)`` into
    ``x * broadcast(1 / d)``, which is up to 1 ulp off and flips rounding ties relative to
    the reference. Broadcasting ``d`` to ``x``'s shape behind an optimization barrier
    keeps the true division.

    Args:
      x: dividends.
      d: divisors, broadcastable to ``x``.

    Returns:
      ``x / d`` elementwise.
    """
    d = jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(d)


def group_params(groups: jnp.ndarray, cfg: QuantConfig, clip: ClipLogits | None = None) -> GroupParams:
    """Scale and zero point of every group of ``groups`` ``[..., n_groups, gs]`` (float32).

    The scale is rounded to ``cfg.scale_dtype`` (its storage dtype) before the zero
    point and codes are derived from it.

    Args:
      groups: grouped weights ``[..., n_groups, gs]``.
      cfg: the quantization config.
      clip: optional :class:`~apiq_jax.quant.ClipLogits` ``[..., n_groups]`` each.

    Returns:
      :class:`GroupParams` of ``[..., n_groups, 1]`` each.
    """
    g = groups.astype(jnp.float32)
    xmax = jnp.max(g, axis=-1, keepdims=True)
    xmin = jnp.min(g, axis=-1, keepdims=True)
    clip = as_clip_logits(clip)
    if clip is not None:
        xmax = jax.nn.sigmoid(clip.gamma.astype(jnp.float32))[..., None] * xmax
        xmin = jax.nn.sigmoid(clip.beta.astype(jnp.float32))[..., None] * xmin
    if cfg.scheme == "asym":
        scale = clip_inclusive(true_divide(xmax - xmin, cfg.qmax), SCALE_MIN, SCALE_MAX)
        scale = _to_storage(scale, cfg)
        zero = jax.lax.stop_gradient(
            jnp.round(clip_inclusive(true_divide(-xmin, scale), -ZERO_LIMIT, ZERO_LIMIT))
        )
    elif cfg.scheme == "sym":
        absmax = jnp.maximum(jnp.abs(xmax), jnp.abs(xmin))
        scale = clip_inclusive(true_divide(absmax, 2 ** (cfg.bits - 1) - 1), SCALE_MIN, SCALE_MAX)
        scale = _to_storage(scale, cfg)
        zero = jnp.full_like(scale, 2 ** (cfg.bits - 1) - 1)
    else:  # nf: absmax scale, no zero point
        scale = _to_storage(jnp.maximum(jnp.abs(xmax), jnp.abs(xmin)), cfg)
        zero = jnp.zeros_like(scale)
    return GroupParams(scale, zero)


def _to_storage(scale: jnp.ndarray, cfg: QuantConfig) -> jnp.ndarray:
    if cfg.scale_dtype == "float32":
        return scale
    return scale.astype(cfg.jnp_scale_dtype).astype(jnp.float32)


def group_codes(groups: jnp.ndarray, params: GroupParams, cfg: QuantConfig) -> jnp.ndarray:
    """Integer codes of every group (float32 values, straight-through differentiable).

    Args:
      groups: grouped weights ``[..., n_groups, gs]``.
      params: their :class:`GroupParams`.
      cfg: the quantization config.

    Returns:
      Codes in ``[0, 2^bits - 1]``, shaped like ``groups``.
    """
    g = groups.astype(jnp.float32)
    if cfg.scheme == "nf":
        book = jnp.asarray(nf_codebook(cfg.bits))
        safe = jnp.where(params.scale == 0, 1.0, params.scale)
        v = jax.lax.stop_gradient(true_divide(g, safe))
        return jnp.argmin(jnp.abs(v[..., None] - book), axis=-1).astype(jnp.float32)
    return clip_inclusive(round_ste(true_divide(g, params.scale)) + params.zero, 0.0, float(cfg.qmax))


def dequantize_groups(codes: jnp.ndarray, params: GroupParams, cfg: QuantConfig) -> jnp.ndarray:
    """``(q - z) * s`` for the uniform schemes, ``codebook[q] * s`` for NormalFloat.

    Args:
      codes: codes shaped like the groups.
      params: the groups' :class:`GroupParams`.
      cfg: the quantization config.

    Returns:
      The dequantized groups (float32).
    """
    if cfg.scheme == "nf":
        book = jnp.asarray(nf_codebook(cfg.bits))
        return book[codes.astype(jnp.int32)] * params.scale
    return (codes - params.zero) * params.scale


def fake_quantize(w: jnp.ndarray, cfg: QuantConfig, *, clip: ClipLogits | None = None) -> jnp.ndarray:
    """Quantize and dequantize ``w`` along its last axis, differentiably.

    Args:
      w: weights ``[..., K]`` (PyTorch ``[out, in]`` layout for a linear layer).
      cfg: the quantization config.
      clip: optional :class:`~apiq_jax.quant.ClipLogits` of shape ``w.shape[:-1] + (n_groups,)``
        each; ``None`` is plain round-to-nearest over the full min/max range.

    Returns:
      ``w_hat`` with ``w``'s shape and dtype. Gradients reach ``w`` (straight-through)
      and the clipping logits.
    """
    clip = as_clip_logits(clip)
    _check_weight(w, cfg, clip)
    k = w.shape[-1]
    groups = to_groups(w, cfg.resolve_group_size(k))
    params = group_params(groups, cfg, clip)
    if cfg.scheme == "nf":
        codes = group_codes(groups, params, cfg)
        book = jnp.asarray(nf_codebook(cfg.bits))
        safe = jnp.where(params.scale == 0, 1.0, params.scale)
        v = true_divide(groups.astype(jnp.float32), safe)
        # Forward value is exactly codebook[q] * s (v - sg(v) == 0); backward is identity in v.
        w_hat = (book[codes.astype(jnp.int32)] + (v - jax.lax.stop_gradient(v))) * params.scale
    else:
        w_hat = dequantize_groups(group_codes(groups, params, cfg), params, cfg)
    return from_groups(w_hat, k).astype(w.dtype)
