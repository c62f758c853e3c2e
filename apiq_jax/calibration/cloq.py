"""CLoQ (Deng et al. 2025, arXiv 2501.18475): RTN base, LoRA from the activation-weighted SVD of ``W - Q``.

Data-aware and closed form, layer by layer: the calibration embeddings flow through the
blocks; in block i the inputs ``X`` of every linear give its Gram matrix ``X^T X`` (the
statistics GPTQ's Hessians are built from: :func:`~apiq_jax.calibration.gptq.stage_hessian`),
every linear is quantized to nearest (``Q``) and each LoRA-targeted linear gets the factors
of :func:`~apiq_jax.calibration.cloq_core.cloq_factors`, the rank-r minimiser of
``||X (W - Q)^T - X L||_F``. By default ``X`` comes from the full-precision model (the
quantity CLoQ optimises); ``sequential=True`` takes it from the model quantized so far
(CLoQ LoRA active), as GPTQ does.

:func:`block_lora_init` is the same solution for a given base ``Q``: ApiQ's ``lora_init``
option (:class:`~apiq_jax.calibration.options.ApiQOptions`) starts ApiQ-bw/-lw from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.calibration.baseline import baseline_result
from apiq_jax.calibration.blocks import (
    as_float32,
    embed_ids,
    float32_view,
    freeze_layer,
    host_chunks,
    layer_idx_arg,
    run_block,
)
from apiq_jax.calibration.cloq_core import DEFAULT_RIDGE, cloq_factors, weighted_error
from apiq_jax.calibration.driver import BlockOutput, run_blocks
from apiq_jax.calibration.gptq import stage_hessian
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult, Stopwatch
from apiq_jax.calibration.stages import STAGES
from apiq_jax.lora import LINEARS, Lora, LoraConfig, lora_from_factors
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig, dequantize

__all__ = ["block_grams", "block_lora_init", "cloq_init", "cloq_step", "svd_factors"]

def block_grams(dense: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, layer_idx: int | None,
                names: Any = LINEARS) -> dict[str, jnp.ndarray]:
    """``X^T X`` (up to a positive factor) of the input of every linear of ``names`` in the block.

    Args:
      dense: the block's params (the linears before each stage as given: dense for the
        full-precision inputs).
      xs: the block inputs ``[n, s, D]`` (a host array: an offloaded cache, streamed to the
        device in chunks of samples).
      config: the model config.
      layer_idx: see :func:`~apiq_jax.calibration.blocks.layer_idx_arg`.
      names: the linears wanted.

    Returns:
      ``{name: [in, in] float32}`` (linears of one stage share one array).
    """
    grams: dict[str, jnp.ndarray] = {}
    for s, (_, linears) in enumerate(STAGES):
        wanted = [n for n in linears if n in names]
        if wanted:
            if isinstance(xs, np.ndarray):  # offloaded cache: the mean over chunks of samples, weighted by size
                h = sum(stage_hessian(dense, jnp.asarray(xs[c]), config, s, layer_idx) * ((c.stop - c.start) / len(xs))
                        for c in host_chunks(xs))
            else:
                h = stage_hessian(dense, xs, config, s, layer_idx)
            grams.update({n: h for n in wanted})
    return grams


@partial(jax.jit, static_argnames=("rank",))
def svd_factors(residual: jnp.ndarray, rank: int, scale: float | jnp.ndarray = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """LoftQ's factors for a given base: the rank-r SVD of ``W - Q``, as LoRA ``a [in, r]``, ``b [r, out]``.

    Args:
      residual: ``W - Q`` ``[out, in]``.
      rank: r (static).
      scale: the LoRA scaling (divided out, half on each side, as :func:`loftq_matrix` does).

    Returns:
      ``(a, b)`` in float32 with ``scale * a @ b`` the best rank-r approximation of ``(W - Q)^T``.
    """
    u, s, vh = jnp.linalg.svd(residual.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    inv = 1.0 / jnp.sqrt(jnp.asarray(scale, jnp.float32))
    return (vh[:rank].T * root[None, :]) * inv, (root[:, None] * u[:, :rank].T) * inv


def _check_rank(lora_config: LoraConfig, w: Any, where: str, method: str) -> None:
    if lora_config.rank > min(w.shape):
        raise ValueError(
            f"LoRA rank {lora_config.rank} exceeds min(out, in) = {min(w.shape)} of {where} {tuple(w.shape)}; "
            f"{method} needs rank <= {min(w.shape)}"
        )


def block_lora_init(kind: str, dense: Mapping[str, Any], base: Mapping[str, Any], lora_config: LoraConfig, *,
                    grams: Mapping[str, jnp.ndarray] | None = None, ridge: float = DEFAULT_RIDGE,
                    where: str = "layer") -> dict[str, dict[str, jnp.ndarray]]:
    """One block's LoRA factors fitted to the quantization error ``W - Q`` of each targeted linear.

    Args:
      kind: "loftq" (rank-r SVD of ``W - Q``) or "cloq" (its ``X^T X``-weighted SVD).
      dense: the block's full-precision linears ``W`` ``[out, in]``.
      base: the same linears quantized (dense arrays ``Q``, dequantized).
      lora_config: rank, alpha (``scale``) and targets.
      grams: ``{name: X^T X}`` (required for "cloq"; see :func:`block_grams`).
      ridge: CLoQ's ridge (see :func:`~apiq_jax.calibration.cloq_core.cloq_factors`).
      where: how errors name the layer.

    Returns:
      ``{name: {"a": [in, r], "b": [r, out]}}`` in float32 for every targeted linear.

    Raises:
      ValueError: an unknown kind, a missing Gram matrix or a rank larger than a linear allows.
    """
    if kind not in ("loftq", "cloq"):
        raise ValueError(f"lora init {kind!r} is not a fitted init; accepted: 'loftq', 'cloq'")
    factors = {}
    for name in (n for n in LINEARS if n in lora_config.targets):
        _check_rank(lora_config, dense[name], f"{where}.{name}", kind)
        residual = jnp.asarray(dense[name], jnp.float32) - jnp.asarray(base[name], jnp.float32)
        if kind == "loftq":
            a, b = svd_factors(residual, lora_config.rank, lora_config.scale)
        else:
            if grams is None or name not in grams:
                raise ValueError(f"lora init 'cloq' needs the Gram matrix of {where}.{name}'s inputs")
            a, b, _ = cloq_factors(residual, grams[name], lora_config.rank, lora_config.scale, ridge)
        factors[name] = {"a": a, "b": b}
    return factors


def cloq_step(quant_config: QuantConfig, config: ModelConfig, lora_config: LoraConfig, ridge: float,
              sequential: bool, i: int, layer: Mapping[str, Any], xs: jnp.ndarray, bar: Progress) -> BlockOutput:
    """CLoQ on block ``i`` (a block step whose stream is the block input ``xs``).

    Args:
      quant_config: the quantizer.
      config: the model config.
      lora_config: rank, alpha and targets.
      ridge: see :func:`~apiq_jax.calibration.cloq_core.cloq_factors`.
      sequential: ``xs`` is the quantized model's stream (else the full-precision one).
      i: the block index.
      layer: its dense params.
      xs: the block's inputs ``[n, s, D]``.
      bar: unused.

    Returns:
      The frozen block, its LoRA, the next stream and a report whose ``extra["weighted_error"]``
      holds, per targeted linear, ``||X (W - Q - L)^T||_F^2 / ||X W^T||_F^2`` of CLoQ's ``L`` and
      of the plain SVD's (LoftQ's factors for the same ``Q``) on this block's inputs.
    """
    del bar
    li = layer_idx_arg(config, i)
    dense = as_float32(layer)
    frozen = freeze_layer(layer, quant_config, where=f"layers.{i}")  # every linear RTN, once
    targets = [n for n in LINEARS if n in lora_config.targets]
    base = {n: dequantize(frozen[n]).astype(jnp.float32) for n in targets}
    grams = block_grams(dense, xs, config, li, targets)
    factors = block_lora_init("cloq", dense, base, lora_config, grams=grams, ridge=ridge, where=f"layers.{i}")
    errors = {}
    for n in targets:
        res = dense[n] - base[n]
        ref = float(weighted_error(dense[n], grams[n], jnp.zeros((res.shape[1], 1)), jnp.zeros((1, res.shape[0]))))
        a, b = svd_factors(res, lora_config.rank, lora_config.scale)
        errors[n] = {
            "cloq": float(weighted_error(res, grams[n], factors[n]["a"], factors[n]["b"], lora_config.scale)) / ref,
            "svd": float(weighted_error(res, grams[n], a, b, lora_config.scale)) / ref,
        }
    lora = Lora({n: {k: v.astype(jnp.asarray(layer[n]).dtype) for k, v in f.items()} for n, f in factors.items()},
                lora_config)
    if sequential:
        xs = run_block(float32_view(frozen), xs, config, lora, layer_idx=li, consume=True)
    else:
        xs = run_block(dense, xs, config, None, layer_idx=li, consume=True)
    return BlockOutput(frozen=frozen, report=BlockReport(i, extra={"weighted_error": errors}), lora=lora, streams=xs)


def cloq_init(params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
              lora_config: LoraConfig, *, key: jax.Array, progress: bool = False, ridge: float = DEFAULT_RIDGE,
              sequential: bool = False, measure_error: bool = True) -> CalibrationResult:
    """CLoQ initialisation of every layer: RTN base, LoRA from the calibration activations in closed form.

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n, seqlen]`` (the activations ``X``).
      quant_config: the quantizer (bits 2, 3 or 4; "nf", "asym" or "sym").
      lora_config: LoRA rank/alpha/targets; targeted linears get
        :func:`~apiq_jax.calibration.cloq_core.cloq_factors`, the others are RTN only.
      key: unused (CLoQ is deterministic; kept for the common signature).
      progress: show a bar over the blocks.
      ridge: ``lambda`` as a fraction of the mean diagonal of ``X^T X`` (> 0).
      sequential: take ``X`` from the model quantized so far (else from the full-precision model).
      measure_error: evaluate the per-block activation errors (skip with False).

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (method "cloq").

    Raises:
      ValueError: a bad ridge, a rank larger than a targeted linear's smaller side, or
        invalid inputs.
    """
    del key
    ids = validate_inputs("cloq", params, model_config, calib_ids, quant_config, lora_config)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < float("inf"):
        raise ValueError(f"ridge={ridge!r} must be a finite number > 0 (a fraction of the mean diagonal of X^T X)")
    timer = Stopwatch()
    step = partial(cloq_step, quant_config, model_config, lora_config, float(ridge), bool(sequential))
    outputs = run_blocks(step, params["layers"], embed_ids(params, ids, model_config), desc="cloq", progress=progress)
    lora = lora_from_factors(params, lora_config, {"layers": [o.lora.factors for o in outputs]})
    jax.block_until_ready(jax.tree.leaves(lora))
    return baseline_result("cloq", params, outputs, lora, ids, model_config, quant_config, lora_config,
                           seconds=timer.elapsed(), options={"ridge": float(ridge), "sequential": bool(sequential)},
                           measure_error=measure_error)
