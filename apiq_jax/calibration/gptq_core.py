"""GPTQ math (Frantar et al. 2022): one weight quantized against the Hessian of its inputs.

:func:`gptq_matrix` is the reference algorithm (IST-DASLab ``gptq.py`` ``fasterquant``, no
act-order), jit-able, for every scheme of :class:`~apiq_jax.quant.QuantConfig` without double
quantization; the wiring over a model is :mod:`apiq_jax.calibration.gptq`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from apiq_jax.quant import QuantConfig, QuantizedTensor, from_codes
from apiq_jax.quant.uniform import GroupParams, dequantize_groups, group_codes, group_params

__all__ = ["GPTQResult", "check_gptq_config", "gptq_matrix", "hessian_from_inputs"]


class GPTQResult(NamedTuple):
    """Output of :func:`gptq_matrix`.

    Attributes:
      q: the quantized weight (QuantizedTensor ``[out, in]``).
      w_hat: its dense value ``[out, in]`` (float32; ``dequantize(q)`` equals it).
      loss: GPTQ's accumulated proxy loss ``sum (w - q)^2 / d^2 / 2`` (scalar).
    """

    q: QuantizedTensor
    w_hat: jnp.ndarray
    loss: jnp.ndarray


def hessian_from_inputs(x: jnp.ndarray) -> jnp.ndarray:
    """GPTQ's Hessian of a linear's inputs.

    Args:
      x: inputs ``[n, seqlen, in]``.

    Returns:
      ``H = 2 / n * sum_samples X_s^T X_s`` ``[in, in]`` (float32).
    """
    x = x.astype(jnp.float32)
    flat = x.reshape(-1, x.shape[-1])
    return (2.0 / x.shape[0]) * (flat.T @ flat)


def check_gptq_config(cfg: QuantConfig) -> None:
    """Refuse configs GPTQ cannot store exactly.

    Args:
      cfg: the quantizer.

    Returns:
      None.

    Raises:
      ValueError: double quantization (it would change the scales the codes were chosen for).
    """
    if cfg.double_quant:
        raise ValueError(
            "GPTQ chooses codes against each group's exact scale, which double quantization would "
            "change afterwards; use double_quant=False with gptq"
        )


def _inverse_factor(W: jnp.ndarray, hessian: jnp.ndarray, percdamp: float, pad: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dead inputs zeroed, ``H`` damped and padded; returns ``(W, U)`` with ``U = chol(H^-1)`` upper."""
    in_f = W.shape[1]
    H = hessian.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
    W = jnp.where(dead[None, :], 0.0, W)
    H = H + percdamp * jnp.mean(jnp.diag(H)) * jnp.eye(in_f, dtype=jnp.float32)
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        H = jax.scipy.linalg.block_diag(H, jnp.eye(pad, dtype=jnp.float32))
    chol = jnp.linalg.cholesky(H)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(in_f + pad, dtype=jnp.float32))
    return W, jnp.linalg.cholesky(hinv).T


def _column_step(i, inner, U1, p1, i1, in_f, cfg):
    """Quantize column ``i`` of the lazy block and feed its error into the block's later columns."""
    W1, Q1, C1, E1, l1 = inner
    col = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
    d = U1[i, i]
    c = group_codes(col[:, None, None], p1, cfg)
    q = dequantize_groups(c, p1, cfg)[:, 0, 0]
    err = (col - q) / d
    W1 = W1 - err[:, None] * U1[i][None, :]
    Q1 = jax.lax.dynamic_update_index_in_dim(Q1, q, i, axis=1)
    C1 = jax.lax.dynamic_update_index_in_dim(C1, c[:, 0, 0].astype(jnp.int32), i, axis=1)
    E1 = jax.lax.dynamic_update_index_in_dim(E1, err, i, axis=1)
    l1 = l1 + jnp.where((i1 + i) < in_f, jnp.sum((col - q) ** 2) / (d * d) / 2.0, 0.0)
    return W1, Q1, C1, E1, l1


def _group_step(g, carry, U, static, params_of, gs, in_f, cfg):
    """Quantize group ``g`` (one lazy block of ``gs`` columns), then update every later column."""
    W, codes, scales, zeros, loss = carry
    out_f, in_pad = W.shape
    i1 = g * gs
    W1 = jax.lax.dynamic_slice(W, (0, i1), (out_f, gs))
    U1 = jax.lax.dynamic_slice(U, (i1, i1), (gs, gs))
    p = params_of(W1, i1) if static is None else GroupParams(static.scale[:, g], static.zero[:, g])
    p1 = GroupParams(p.scale[:, :, :1], p.zero[:, :, :1])  # [out, 1, 1]
    zeros_blk = jnp.zeros((out_f, gs), jnp.float32)
    init = (W1, zeros_blk, jnp.zeros((out_f, gs), jnp.int32), zeros_blk, jnp.float32(0.0))
    col = partial(_column_step, U1=U1, p1=p1, i1=i1, in_f=in_f, cfg=cfg)
    _, Q1, C1, E1, l1 = jax.lax.fori_loop(0, gs, col, init)
    # lazy batch update of every later column (U is upper triangular: earlier columns untouched)
    rows = jax.lax.dynamic_slice(U, (i1, 0), (gs, in_pad))
    later = (jnp.arange(in_pad) >= i1 + gs)[None, :]
    W = W - jnp.where(later, E1 @ rows, 0.0)
    W = jax.lax.dynamic_update_slice(W, Q1, (0, i1))
    codes = jax.lax.dynamic_update_slice(codes, C1, (0, i1))
    scales = scales.at[:, g].set(p1.scale[:, 0, 0])
    zeros = zeros.at[:, g].set(p1.zero[:, 0, 0])
    return W, codes, scales, zeros, loss + l1


@partial(jax.jit, static_argnames=("quant_config", "static_groups"))
def gptq_matrix(
    w: jnp.ndarray,
    hessian: jnp.ndarray,
    quant_config: QuantConfig,
    *,
    percdamp: float = 0.01,
    static_groups: bool = False,
) -> GPTQResult:
    """GPTQ quantization of one weight ``w [out, in]`` given the Hessian of its inputs (pure, jitted).

    Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and ``W[:, i] = 0``; ``H += percdamp *
    mean(diag H) * I``; ``U = chol(H^-1)`` (upper); columns are quantized left to right in
    lazy blocks of one quantization group, each column's error ``(w - q) / U_ii`` fed back
    into the not yet quantized columns through ``U``. A group's scale and zero point come
    from the library's quantizer formulas (:func:`~apiq_jax.quant.uniform.group_params`, no
    clipping) on the error-updated weights when the group starts (``static_groups``: on the
    original weights). Codes use :func:`~apiq_jax.quant.quantize`'s rounding and clipping and
    are stored with :func:`~apiq_jax.quant.from_codes`, so the result dequantizes exactly to
    ``w_hat``. A trailing partial group is padded with zero-weight columns whose Hessian
    block is the identity; they never influence the real columns.

    Args:
      w: float weight ``[out, in]``.
      hessian: ``[in, in]`` (:func:`hessian_from_inputs`).
      quant_config: the quantizer (static; "asym", "sym" or "nf", no double quantization).
      percdamp: dampening as a fraction of the mean Hessian diagonal.
      static_groups: group constants from the original weights (static).

    Returns:
      :class:`GPTQResult`.

    Raises:
      ValueError: a double-quantized config.
    """
    check_gptq_config(quant_config)
    out_f, in_f = w.shape
    gs = quant_config.resolve_group_size(in_f)
    n_groups = math.ceil(in_f / gs)
    W, U = _inverse_factor(w.astype(jnp.float32), hessian, percdamp, n_groups * gs - in_f)
    cols = jnp.arange(gs)

    def params_of(block: jnp.ndarray, start: jnp.ndarray) -> GroupParams:
        # padded columns repeat the last real one (as apiq_jax.quant.groups.to_groups does)
        idx = jnp.minimum(cols, in_f - 1 - start)
        return group_params(block[:, idx][:, None, :], quant_config)

    static: Any = None
    if static_groups:
        groups = W.reshape(out_f, n_groups, gs)
        static = jax.vmap(params_of, in_axes=(1, 0), out_axes=1)(groups, jnp.arange(n_groups) * gs)
    step = partial(_group_step, U=U, static=static, params_of=params_of, gs=gs, in_f=in_f, cfg=quant_config)
    carry = (W, jnp.zeros((out_f, n_groups * gs), jnp.int32), jnp.zeros((out_f, n_groups), jnp.float32),
             jnp.zeros((out_f, n_groups), jnp.float32), jnp.float32(0.0))
    W, codes, scales, zeros, loss = jax.lax.fori_loop(0, n_groups, step, carry)
    qt = from_codes(codes, scales, zeros, (out_f, in_f), quant_config, w.dtype)
    return GPTQResult(qt, W[:, :in_f], loss)
