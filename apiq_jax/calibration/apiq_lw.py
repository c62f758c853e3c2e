"""ApiQ-lw (layer-wise): :func:`apiq_lw`, ApiQ one stage of linears at a time.

Within block i the stages of :data:`~apiq_jax.calibration.stages.STAGES` (q/k/v, o,
gate/up, down) are calibrated in order. For each stage, ``X`` is its input in the
full-precision block on ``x_fp`` and ``X_q`` its input in the partially quantized block on
``x_q``: every linear of the earlier stages already frozen, with its trained LoRA active.
The stage's clipping logits and LoRA factors are trained on the objective of
:mod:`apiq_jax.calibration.apiq_lw_core`, then its linears are frozen. Once the block is
done, ``x_fp`` and ``x_q`` are advanced through it as in ApiQ-bw.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from apiq_jax.calibration.apiq import ApiQContext, calibrate_apiq, loss_curve
from apiq_jax.calibration.apiq_lw_core import train_stage_lw
from apiq_jax.calibration.blocks import float32_view, with_quantized
from apiq_jax.calibration.driver import BlockOutput
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult
from apiq_jax.calibration.stages import STAGES, stage_inputs
from apiq_jax.lora import LINEARS, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["apiq_lw", "lw_step"]


def lw_step(ctx: ApiQContext, i: int, layer: Mapping[str, Any], streams: dict[str, Any], bar: Progress) -> BlockOutput:
    """Calibrate block ``i`` with ApiQ-lw, stage by stage: an :data:`~apiq_jax.calibration.apiq.ApiQStep`.

    Args:
      ctx, i, layer, streams, bar: see :data:`~apiq_jax.calibration.apiq.ApiQStep`.

    Returns:
      The frozen block, its trained LoRA and the streams after it; its report's loss curve is
      the sum over stages, ``extra["stage_loss_curves"]`` has each stage's.
    """
    start = ctx.begin(i, layer, streams, consume_fp=False)  # x_fp feeds every stage's inputs
    lora0 = start.state["lora"]
    bar.start_inner(f"block {i}", ctx.opts.epochs * len(STAGES))
    view = dict(start.dense)  # float32; linears replaced by float32 views of their frozen form stage by stage
    quantized: dict[str, Any] = {}
    clip: dict[str, Any] = {}
    factors: dict[str, Any] = {}  # LoRA of the stages done so far (active in the next stages' inputs)
    curves: dict[str, list[float]] = {}
    for stage, (_, names) in enumerate(STAGES):
        lora_names = tuple(n for n in names if n in lora0)
        x_in = stage_inputs(start.dense, streams["x_fp"], ctx.config, stage, None, start.layer_idx)
        xq_in = stage_inputs(view, streams["x_q"], ctx.config, stage,
                             lora0.replace(factors) if factors else None, start.layer_idx)
        st0 = {"clip": {n: start.state["clip"][n] for n in names},
               "lora": lora0.replace({n: lora0.factors[n] for n in lora_names})}
        st, losses, _ = train_stage_lw(start.dense, st0, x_in, xq_in, bar.token(), names=names,
                                       lora_names=lora_names, qcfg=ctx.qcfg, opts=ctx.opts)
        curves["+".join(names)] = list(loss_curve(losses))
        clip.update(st["clip"])
        factors.update(st["lora"].factors)
        done = ctx.freeze(start, st["clip"], targets=names)
        quantized.update(done)
        view.update(float32_view(done))
    train = {"clip": {n: clip[n] for n in LINEARS}, "lora": lora0.replace(factors)}
    total = tuple(np.sum([np.asarray(c) for c in curves.values()], axis=0).tolist())
    return ctx.end(start, with_quantized(layer, quantized), train, streams["x_q"], total, {"stage_loss_curves": curves})


def apiq_lw(
    params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
    lora_config: LoraConfig, *, key: jax.Array | None = None, options: ApiQOptions = ApiQOptions(),
    lora_init: Mapping[str, Any] | None = None, work_dir: str | os.PathLike | None = None, progress: bool = False,
    on_block_end: Callable[[int, BlockReport], None] | None = None, lazy_result: bool = False,
) -> CalibrationResult:
    """ApiQ-lw calibration (layer-wise): one stage of input-sharing linears at a time.

    For every linear, minimises ``mean((X W^T - (X_q Q^T + (alpha/r) X_q a b))^2)`` over its
    clipping logits and LoRA factors, ``X`` / ``X_q`` its inputs in the full-precision /
    partially quantized block. ``options.aug_loss`` does not apply (recorded as False).

    Args:
      params, model_config, calib_ids, quant_config, lora_config, key, options, lora_init,
        work_dir, progress, on_block_end, lazy_result: as for :func:`apiq_jax.calibration.apiq_bw.apiq_bw`
        (``options.epochs`` passes per stage).

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (as :func:`apiq_bw`'s; each
      block report has ``extra["stage_loss_curves"]``).

    Raises:
      ValueError: invalid inputs or options (the message names the value).
    """
    opts = dataclasses.replace(options, aug_loss=False) if isinstance(options, ApiQOptions) else options
    return calibrate_apiq(
        "apiq-lw", lw_step, params, model_config, calib_ids, quant_config, lora_config, key=key, opts=opts,
        lora_init=lora_init, work_dir=work_dir, progress=progress, on_block_end=on_block_end,
        lazy_result=lazy_result,
    )
