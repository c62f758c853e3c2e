"""Baselines beside ApiQ: RTN, QLoRA init, LoftQ and GPTQ(-LoRA).

All four share the calibration signature of :mod:`apiq_jax.calibration.common`::

    method(params, model_config, calib_ids, quant_config, lora_config, *, key,
           progress=False, **options) -> CalibrationResult

* :func:`rtn_init` — round-to-nearest quantization of every linear (no clipping), LoRA
  with the QLoRA init (``a`` kaiming-uniform, ``b = 0``).
* :func:`qlora_init` — the same construction under QLoRA's name: RTN with the NormalFloat
  codebook when ``quant_config.scheme == "nf"`` (QLoRA's choice; the CLI and the demo
  use it) or the uniform quantizer otherwise, ``a`` kaiming-uniform, ``b = 0``.
* :func:`loftq_init` — LoftQ (Li et al. 2023): alternating quantization and rank-r SVD of
  the residual, data-free (the calibration ids only feed the error report).
  :func:`loftq_matrix` is the jit-able per-matrix core.
* :func:`gptq_init` — GPTQ (Frantar et al. 2022) on every linear with Hessians of the
  linear's inputs collected block by block from the partially quantized model, then the
  QLoRA init. :func:`gptq_matrix` is the jit-able per-matrix core.

Every quantized weight is a :class:`~apiq_jax.quant.QuantizedTensor` built with the
library's own quantizer formulas, so ``dequantize`` returns exactly what the method chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.calibration.common import (
    QUANT_TARGETS,
    BlockReport,
    CalibrationReport,
    CalibrationResult,
    Stopwatch,
    block_errors,
    embed_ids,
    freeze_params,
    run_block,
    validate_inputs,
)
from apiq_jax.lora import LoraConfig, init_lora, lora_from_factors
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import attention, attention_mask_matrix, mlp, rms_norm, rope_cos_sin
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize, pack_codes, quantize
from apiq_jax.quant.uniform import GroupParams, dequantize_groups, group_codes, group_params

__all__ = [
    "GPTQResult", "LoftQResult", "gptq_init", "gptq_matrix", "hessian_from_inputs", "loftq_init",
    "loftq_matrix", "qlora_init", "rtn_init",
]

_PACK = 32  # packed code rows are padded to a multiple of 32 codes (apiq_jax.quant.packing)


# =============================================================================================
# shared pieces
# =============================================================================================
def _progress(iterable: Any, enabled: bool, desc: str, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _finish(
    name: str,
    params: Mapping[str, Any],
    frozen: Mapping[str, Any],
    lora: Mapping[str, Any],
    ids: np.ndarray,
    model_config: ModelConfig,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    seconds: float,
    options: Mapping[str, Any],
    block_extra: Sequence[Mapping[str, Any]] | None = None,
    measure_error: bool = True,
) -> CalibrationResult:
    """Per-block activation errors on the calibration set and the result object.

    ``seconds`` (the method's own time) excludes this error evaluation, whose duration is
    stored as ``report.extra["eval_seconds"]``.
    """
    t = Stopwatch()
    n = model_config.num_hidden_layers
    errs: list[float | None] = (
        list(block_errors(params, frozen, lora, ids, model_config))
        if measure_error else [None] * n
    )
    extra = block_extra or [{} for _ in range(n)]
    blocks = [BlockReport(i, error_after=e, extra=dict(extra[i])) for i, e in enumerate(errs)]
    report = CalibrationReport.build(
        name, quant_config, lora_config, ids.shape, blocks=blocks, seconds=seconds,
        options=options, extra={"eval_seconds": t.elapsed()},
    )
    return CalibrationResult(frozen, lora, report)


# =============================================================================================
# RTN / QLoRA
# =============================================================================================
def _rtn(
    name: str,
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    key: jax.Array,
    measure_error: bool,
) -> CalibrationResult:
    ids = validate_inputs(params, model_config, calib_ids, quant_config, lora_config)
    t = Stopwatch()
    frozen = freeze_params(params, quant_config)
    lora = init_lora(params, lora_config, key, method="qlora")
    jax.block_until_ready(jax.tree.leaves(lora))
    return _finish(name, params, frozen, lora, ids, model_config, quant_config, lora_config,
                   t.elapsed(), {}, measure_error=measure_error)


def rtn_init(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array,
    progress: bool = False,
    measure_error: bool = True,
) -> CalibrationResult:
    """Round-to-nearest quantization of all seven linears of every layer, QLoRA-initialised LoRA.

    Each weight is quantized with ``quant_config`` over its full min/max range (no
    clipping); LoRA ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` and ``b = 0`` on
    ``lora_config.targets``, so the model equals the plain RTN model. ``calib_ids`` are
    only used for the per-block activation error of the report (skipped with
    ``measure_error=False``). ``progress`` is accepted for the common signature.
    """
    del progress
    return _rtn("rtn", params, model_config, calib_ids, quant_config, lora_config, key, measure_error)


def qlora_init(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array,
    progress: bool = False,
    measure_error: bool = True,
) -> CalibrationResult:
    """The QLoRA initialisation: RTN quantization, ``a`` kaiming-uniform, ``b = 0``.

    QLoRA stores its base weights in NormalFloat (``quant_config.scheme == "nf"``, the
    default the CLI and the demo pick for this method); a uniform scheme gives the
    uniform-RTN variant. Otherwise identical to :func:`rtn_init` (reported as "qlora").
    """
    del progress
    return _rtn("qlora", params, model_config, calib_ids, quant_config, lora_config, key, measure_error)


# =============================================================================================
# LoftQ
# =============================================================================================
class LoftQResult(NamedTuple):
    """Output of :func:`loftq_matrix`.

    Attributes:
      q: the final quantized weight ``Q_T`` as a QuantizedTensor (``[out, in]``).
      a: LoRA ``a [in, r]``; ``b``: LoRA ``b [r, out]``. ``scale * (a @ b).T`` is the rank-r
        SVD approximation of ``W - Q_T``.
      iter_q: dense ``Q_t`` of every iteration ``[T, out, in]`` (None unless requested).
      iter_s: all singular values of ``W - Q_t`` for every iteration ``[T, min(out, in)]``
        (None unless requested).
    """

    q: QuantizedTensor
    a: jnp.ndarray
    b: jnp.ndarray
    iter_q: jnp.ndarray | None
    iter_s: jnp.ndarray | None


@partial(jax.jit, static_argnames=("quant_config", "rank", "num_iter", "history"))
def loftq_matrix(
    w: jnp.ndarray,
    quant_config: QuantConfig,
    rank: int,
    scale: float | jnp.ndarray = 1.0,
    num_iter: int = 1,
    *,
    history: bool = False,
) -> LoftQResult:
    """LoftQ on one weight ``w [out, in]`` (pure, jitted).

    ``res = W``; for ``t = 1..T``: ``Q_t = dequant(quant(res))``; ``U S Vh = svd(W - Q_t)``;
    ``B = U_r sqrt(S_r)`` ``[out, r]``, ``A = sqrt(S_r) Vh_r`` ``[r, in]``; ``res = W - B A``.
    The factors are stored in this library's layout and divided by the LoRA scaling, half
    on each side: ``a = A.T / sqrt(scale)``, ``b = B.T / sqrt(scale)``, so that the scaled
    term ``scale * (x @ a) @ b`` equals ``x @ (B A).T`` exactly as peft's unscaled factors
    do. The quantizer is ``quant_config`` (uniform or NormalFloat, groups along ``in``);
    every ``Q_t`` is what :func:`~apiq_jax.quant.quantize` stores, so the returned
    QuantizedTensor dequantizes to ``Q_T``.

    With ``scheme="nf"``, ``group_size=64``, ``scale_dtype="float32"`` and ``in`` a
    multiple of 64 the quantizer is exactly peft's ``NFQuantizer`` (blocks of 64
    consecutive row-major elements, absmax, nearest codebook level, lower index on ties).
    SVD signs are arbitrary: compare ``a @ b`` or flip one sign per rank component.

    Args:
      w: float weight ``[out, in]``.
      quant_config: quantizer (static).
      rank: LoRA rank r (static), at most ``min(out, in)``.
      scale: LoRA scaling ``alpha / r`` the factors will be used with.
      num_iter: T >= 1 (static).
      history: also return every ``Q_t`` and singular-value vector (static).
    """
    if num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be >= 1")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank={rank!r} must lie in [1, {min(w.shape)}] for a weight of shape {w.shape}")
    w32 = w.astype(jnp.float32)
    res = w32
    qs, ss = [], []
    qt = a_t = b_t = None
    for _ in range(num_iter):
        qt = quantize(res.astype(w.dtype), quant_config)
        q = dequantize(qt).astype(jnp.float32)
        u, s, vh = jnp.linalg.svd(w32 - q, full_matrices=False)
        root = jnp.sqrt(s[:rank])
        b_t = u[:, :rank] * root[None, :]  # peft lora_B [out, r]
        a_t = root[:, None] * vh[:rank]  # peft lora_A [r, in]
        res = w32 - b_t @ a_t
        if history:
            qs.append(q)
            ss.append(s)
    inv = 1.0 / jnp.sqrt(jnp.asarray(scale, jnp.float32))
    return LoftQResult(
        q=qt,
        a=(a_t.T * inv).astype(w.dtype),
        b=(b_t.T * inv).astype(w.dtype),
        iter_q=jnp.stack(qs) if history else None,
        iter_s=jnp.stack(ss) if history else None,
    )


def loftq_init(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array,
    progress: bool = False,
    num_iter: int = 1,
    measure_error: bool = True,
) -> CalibrationResult:
    """LoftQ initialisation of every layer (data-free).

    Linears in ``lora_config.targets`` get :func:`loftq_matrix` (``num_iter`` alternations,
    peft's default 1; the LoftQ paper uses up to 5), the LoRA factors scaled for
    ``lora.scale = alpha / r``. Quantized linears without LoRA are plain RTN.
    ``calib_ids`` only feed the per-block error of the report; ``key`` is unused (LoftQ
    is deterministic).

    Raises ValueError when ``lora_config.rank`` exceeds a targeted linear's smaller side
    or ``num_iter < 1``.
    """
    del key
    ids = validate_inputs(params, model_config, calib_ids, quant_config, lora_config)
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be an int >= 1")
    t = Stopwatch()
    scale = lora_config.scale
    frozen_layers, lora_layers = [], []
    n_layers = len(params["layers"])
    for i in _progress(range(n_layers), progress, "loftq", n_layers):
        layer = params["layers"][i]
        new = dict(layer)
        entry = {}
        for name in QUANT_TARGETS:
            w = layer[name]
            if name in lora_config.targets:
                if lora_config.rank > min(w.shape):
                    raise ValueError(
                        f"LoRA rank {lora_config.rank} exceeds min(out, in) = {min(w.shape)} of "
                        f"layers.{i}.{name} {tuple(w.shape)}; LoftQ needs rank <= {min(w.shape)}"
                    )
                out = loftq_matrix(w, quant_config, lora_config.rank, scale, num_iter)
                new[name] = out.q
                entry[name] = {"a": out.a, "b": out.b}
            else:
                new[name] = quantize(w, quant_config)
        frozen_layers.append(new)
        lora_layers.append(entry)
    frozen = dict(params)
    frozen["layers"] = frozen_layers
    lora = lora_from_factors(params, lora_config, {"layers": lora_layers})
    jax.block_until_ready(jax.tree.leaves(lora))
    return _finish("loftq", params, frozen, lora, ids, model_config, quant_config, lora_config,
                   t.elapsed(), {"num_iter": num_iter}, measure_error=measure_error)


# =============================================================================================
# GPTQ
# =============================================================================================
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
    """GPTQ's Hessian ``H = 2 / n * sum_samples X_s^T X_s`` of inputs ``x [n, seqlen, in]``."""
    x = x.astype(jnp.float32)
    n = x.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    return (2.0 / n) * (flat.T @ flat)


def _check_gptq_config(cfg: QuantConfig) -> None:
    if cfg.double_quant:
        raise ValueError(
            "GPTQ chooses codes against each group's exact scale, which double quantization would "
            "change afterwards; use double_quant=False with gptq"
        )


def _pack_quantized(
    codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray, shape: tuple[int, int],
    cfg: QuantConfig, dtype: Any,
) -> QuantizedTensor:
    """QuantizedTensor from codes ``[out, n_groups * gs]`` and constants ``[out, n_groups]``.

    Same storage layout as :func:`apiq_jax.quant.quantize` (codes padded to a multiple of
    32 and bit-packed, scales in the config's scale dtype, int16 zero points for "asym").
    """
    pad = (-codes.shape[-1]) % _PACK
    c = codes.astype(jnp.uint32)
    if pad:
        c = jnp.pad(c, ((0, 0), (0, pad)))
    zeros = zero.astype(jnp.int16) if cfg.scheme == "asym" else None
    return QuantizedTensor(
        pack_codes(c, cfg.bits), scale.astype(cfg.jnp_scale_dtype), zeros, tuple(shape), cfg,
        jnp.dtype(dtype).name,
    )


@partial(jax.jit, static_argnames=("quant_config", "static_groups"))
def gptq_matrix(
    w: jnp.ndarray,
    hessian: jnp.ndarray,
    quant_config: QuantConfig,
    *,
    percdamp: float = 0.01,
    static_groups: bool = False,
) -> GPTQResult:
    """GPTQ quantization of one weight ``w [out, in]`` given ``hessian [in, in]`` (pure, jitted).

    The reference algorithm (IST-DASLab ``gptq.py`` ``fasterquant``, no act-order): dead
    inputs (``H_ii = 0``) get ``H_ii = 1`` and ``W[:, i] = 0``; ``H += percdamp *
    mean(diag H) * I``; ``U = chol(H^-1)`` (upper); columns are quantized left to right in
    lazy blocks of one quantization group, each column's error ``(w - q) / U_ii`` fed back
    into the not yet quantized columns through ``U``. Groups are contiguous runs of
    ``group_size`` along ``in``; a group's scale and zero point are computed with the
    library's quantizer formulas (:func:`~apiq_jax.quant.uniform.group_params`, no
    clipping) from the error-updated weights when the group starts
    (``static_groups=True``: from the original weights, before any update). Codes use the
    same rounding and clipping as :func:`~apiq_jax.quant.quantize`, so the returned
    QuantizedTensor dequantizes exactly to ``w_hat``. Works for "asym", "sym" and "nf".

    A trailing partial group (``in`` not a multiple of the group size) is padded with
    zero-weight columns whose Hessian block is the identity; they never influence the
    real columns and are dropped on dequantization.
    """
    _check_gptq_config(quant_config)
    out_f, in_f = w.shape
    gs = quant_config.resolve_group_size(in_f)
    n_groups = math.ceil(in_f / gs)
    in_pad = n_groups * gs
    pad = in_pad - in_f

    W = w.astype(jnp.float32)
    H = hessian.astype(jnp.float32)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
    W = jnp.where(dead[None, :], 0.0, W)
    damp = percdamp * jnp.mean(jnp.diag(H))
    H = H + damp * jnp.eye(in_f, dtype=jnp.float32)
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        H = jax.scipy.linalg.block_diag(H, jnp.eye(pad, dtype=jnp.float32))
    chol = jnp.linalg.cholesky(H)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(in_pad, dtype=jnp.float32))
    U = jnp.linalg.cholesky(hinv).T  # upper Cholesky factor of H^-1

    cols = jnp.arange(gs)

    def params_of(block: jnp.ndarray, start: jnp.ndarray) -> GroupParams:
        # padded columns repeat the last real one (as apiq_jax.quant.groups.to_groups does)
        idx = jnp.minimum(cols, in_f - 1 - start)
        return group_params(block[:, idx][:, None, :], quant_config)

    static = None
    if static_groups:
        groups = W.reshape(out_f, n_groups, gs)
        static = jax.vmap(lambda g, s: params_of(g, s), in_axes=(1, 0), out_axes=1)(
            groups, jnp.arange(n_groups) * gs
        )  # GroupParams of [out, n_groups, 1, 1]

    def block_step(g: jnp.ndarray, carry):
        W, codes, scales, zeros, loss = carry
        i1 = g * gs
        W1 = jax.lax.dynamic_slice(W, (0, i1), (out_f, gs))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (gs, gs))
        if static is None:
            p = params_of(W1, i1)
        else:
            p = GroupParams(static.scale[:, g], static.zero[:, g])
        p1 = GroupParams(p.scale[:, :, :1], p.zero[:, :, :1])  # [out, 1, 1]

        def col_step(i, inner):
            W1, Q1, C1, E1, l1 = inner
            col = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
            d = U1[i, i]
            c = group_codes(col[:, None, None], p1, quant_config)
            q = dequantize_groups(c, p1, quant_config)[:, 0, 0]
            err = (col - q) / d
            W1 = W1 - err[:, None] * U1[i][None, :]
            Q1 = jax.lax.dynamic_update_index_in_dim(Q1, q, i, axis=1)
            C1 = jax.lax.dynamic_update_index_in_dim(C1, c[:, 0, 0].astype(jnp.int32), i, axis=1)
            E1 = jax.lax.dynamic_update_index_in_dim(E1, err, i, axis=1)
            valid = (i1 + i) < in_f
            l1 = l1 + jnp.where(valid, jnp.sum((col - q) ** 2) / (d * d) / 2.0, 0.0)
            return W1, Q1, C1, E1, l1

        zeros_blk = jnp.zeros((out_f, gs), jnp.float32)
        init = (W1, zeros_blk, jnp.zeros((out_f, gs), jnp.int32), zeros_blk, jnp.float32(0.0))
        _, Q1, C1, E1, l1 = jax.lax.fori_loop(0, gs, col_step, init)
        # lazy batch update of every later column (U is upper triangular: earlier columns untouched)
        rows = jax.lax.dynamic_slice(U, (i1, 0), (gs, in_pad))
        later = (jnp.arange(in_pad) >= i1 + gs)[None, :]
        W = W - jnp.where(later, E1 @ rows, 0.0)
        W = jax.lax.dynamic_update_slice(W, Q1, (0, i1))
        codes = jax.lax.dynamic_update_slice(codes, C1, (0, i1))
        scales = scales.at[:, g].set(p1.scale[:, 0, 0])
        zeros = zeros.at[:, g].set(p1.zero[:, 0, 0])
        return W, codes, scales, zeros, loss + l1

    carry = (
        W,
        jnp.zeros((out_f, in_pad), jnp.int32),
        jnp.zeros((out_f, n_groups), jnp.float32),
        jnp.zeros((out_f, n_groups), jnp.float32),
        jnp.float32(0.0),
    )
    W, codes, scales, zeros, loss = jax.lax.fori_loop(0, n_groups, block_step, carry)
    qt = _pack_quantized(codes, scales, zeros, (out_f, in_f), quant_config, w.dtype)
    return GPTQResult(qt, W[:, :in_f], loss)


# --- inputs of each linear inside one decoder block -----------------------------------------
# True-sequential order of the reference (llama.py --true-sequential): each stage is quantized
# before the inputs of the next stage are collected.
_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)


def _stage_input(p: Mapping[str, Any], x: jnp.ndarray, config: ModelConfig, stage: str,
                 layer_idx: int) -> jnp.ndarray:
    """Input ``[1, s, in]`` of the linears of ``stage`` when block ``p`` runs on ``x [1, s, D]``.

    Wires the block exactly as :func:`apiq_jax.models.llama.block_forward` does; the input of
    o_proj (down_proj) is read by running the attention (MLP) with an identity output
    projection.
    """
    s = x.shape[1]
    cos, sin = rope_cos_sin(jnp.arange(s, dtype=jnp.int32)[None], config, x.dtype)
    mask = attention_mask_matrix(s, None, config.attention_window(layer_idx))
    h = rms_norm(x, p["input_layernorm"], config.rms_norm_eps)
    if stage == "qkv":
        return h
    if stage == "o":
        q_dim = config.num_attention_heads * config.head_dim
        ident = {k: v for k, v in p.items() if k != "o_proj_bias"}
        ident["o_proj"] = jnp.eye(q_dim, dtype=x.dtype)
        return attention(ident, h, config, cos=cos, sin=sin, mask=mask)
    x2 = x + attention(p, h, config, cos=cos, sin=sin, mask=mask)
    h2 = rms_norm(x2, p["post_attention_layernorm"], config.rms_norm_eps)
    if stage == "gate_up":
        return h2
    ident = {k: v for k, v in p.items() if k != "down_proj_bias"}
    ident["down_proj"] = jnp.eye(config.intermediate_size, dtype=x.dtype)
    return mlp(ident, h2)


@partial(jax.jit, static_argnames=("config", "stage", "layer_idx"))
def _stage_hessian(p: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, stage: str,
                   layer_idx: int) -> jnp.ndarray:
    """GPTQ Hessian ``2/n sum_s X_s^T X_s`` of the stage's input over samples ``xs [n, s, D]``."""

    def body(h, x):
        inp = _stage_input(p, x[None], config, stage, layer_idx)[0].astype(jnp.float32)
        return h + inp.T @ inp, None

    in_dim = {"qkv": config.hidden_size, "o": config.num_attention_heads * config.head_dim,
              "gate_up": config.hidden_size, "down": config.intermediate_size}[stage]
    h0 = jnp.zeros((in_dim, in_dim), jnp.float32)
    h, _ = jax.lax.scan(body, h0, xs)
    return h * (2.0 / xs.shape[0])


def gptq_init(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array,
    progress: bool = False,
    percdamp: float = 0.01,
    true_sequential: bool = True,
    static_groups: bool = False,
    measure_error: bool = True,
) -> CalibrationResult:
    """GPTQ-quantized base model with the QLoRA init on top (GPTQ-LoRA).

    Sequential like the reference: the calibration embeddings flow through the model
    block by block; in block i the inputs of each linear are taken from the model whose
    blocks < i are already GPTQ-quantized (``x_q``). With ``true_sequential`` (default)
    the block's linears are handled in the order q/k/v, o, gate/up, down, and the inputs
    of each stage come from the block with the earlier stages already quantized;
    otherwise all seven Hessians come from the full-precision block. After the block is
    quantized, ``x_q`` is advanced through it. LoRA: ``a`` kaiming-uniform, ``b = 0``.

    Options: ``percdamp`` (dampening, fraction of the mean Hessian diagonal, default
    0.01), ``static_groups`` (group constants from the original weights, see
    :func:`gptq_matrix`). Raises ValueError for double-quantized configs.
    """
    ids = validate_inputs(params, model_config, calib_ids, quant_config, lora_config)
    _check_gptq_config(quant_config)
    if not (isinstance(percdamp, (int, float)) and 0 <= percdamp < 1):
        raise ValueError(f"percdamp={percdamp!r} must be a number in [0, 1)")
    t = Stopwatch()
    x_q = embed_ids(params, ids, model_config)
    frozen_layers: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    n_layers = len(params["layers"])
    for i in _progress(range(n_layers), progress, "gptq", n_layers):
        layer = params["layers"][i]
        work = dict(layer)  # dense weights, quantized stages replaced by their w_hat
        frozen = dict(layer)
        losses: dict[str, float] = {}
        hessians = {}
        if not true_sequential:
            hessians = {st: _stage_hessian(layer, x_q, model_config, st, i) for st, _ in _STAGES}
        for stage, names in _STAGES:
            h = hessians[stage] if not true_sequential else _stage_hessian(work, x_q, model_config, stage, i)
            for name in names:
                res = gptq_matrix(layer[name], h, quant_config, percdamp=float(percdamp),
                                  static_groups=static_groups)
                frozen[name] = res.q
                work[name] = res.w_hat.astype(layer[name].dtype)
                losses[name] = float(res.loss)
        x_q = run_block(work, x_q, model_config, None, layer_idx=i)
        frozen_layers.append(frozen)
        extras.append({"gptq_loss": losses})
    frozen_params = dict(params)
    frozen_params["layers"] = frozen_layers
    lora = init_lora(params, lora_config, key, method="qlora")
    jax.block_until_ready(x_q)
    options = {"percdamp": percdamp, "true_sequential": true_sequential, "static_groups": static_groups}
    return _finish("gptq", params, frozen_params, lora, ids, model_config, quant_config, lora_config,
                   t.elapsed(), options, block_extra=extras, measure_error=measure_error)
