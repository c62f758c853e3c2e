"""Round-to-nearest baselines: :func:`rtn_init` and :func:`qlora_init` (QLoRA's initialisation).

Every linear is quantized over its full min/max range (no clipping) through
:func:`apiq_jax.quant.quantize`; the LoRA gets the QLoRA init (``a`` kaiming-uniform,
``b = 0``), so the model with LoRA equals the plain quantized model.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax

from apiq_jax.calibration.baseline import baseline_result
from apiq_jax.calibration.blocks import freeze_layer
from apiq_jax.calibration.driver import BlockOutput, run_blocks
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult, Stopwatch
from apiq_jax.lora import LoraConfig, init_lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["qlora_init", "rtn_init", "rtn_step"]


def rtn_step(quant_config: QuantConfig, i: int, layer: Mapping[str, Any], streams: Any, bar: Progress) -> BlockOutput:
    """Quantize block ``i``'s seven linears to nearest (a block step; no streams).

    Args:
      quant_config: the quantizer.
      i: the block index.
      layer: its dense params.
      streams: unused (None).
      bar: unused.

    Returns:
      The frozen block and an empty report.
    """
    del streams, bar
    return BlockOutput(frozen=freeze_layer(layer, quant_config, where=f"layers.{i}"), report=BlockReport(i))


def _rtn(
    method: str, params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
    lora_config: LoraConfig, key: jax.Array, progress: bool, measure_error: bool,
) -> CalibrationResult:
    ids = validate_inputs(method, params, model_config, calib_ids, quant_config, lora_config)
    timer = Stopwatch()
    outputs = run_blocks(partial(rtn_step, quant_config), params["layers"], desc=method, progress=progress)
    lora = init_lora(params, lora_config, key, method="qlora")
    jax.block_until_ready(jax.tree.leaves(lora))
    return baseline_result(method, params, outputs, lora, ids, model_config, quant_config, lora_config,
                           seconds=timer.elapsed(), options={}, measure_error=measure_error)


def rtn_init(params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
             lora_config: LoraConfig, *, key: jax.Array, progress: bool = False,
             measure_error: bool = True) -> CalibrationResult:
    """Round-to-nearest quantization of all seven linears of every layer, QLoRA-initialised LoRA.

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n, seqlen]``; only used for the per-block activation error
        of the report.
      quant_config: the quantizer (bits 2, 3 or 4; "asym", "sym" or "nf").
      lora_config: LoRA rank/alpha/targets; ``a ~ U(-1/sqrt(in), 1/sqrt(in))``, ``b = 0``.
      key: PRNG key of the LoRA init.
      progress: show a bar over the blocks.
      measure_error: evaluate the per-block activation errors (skip with False).

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (method "rtn").
    """
    return _rtn("rtn", params, model_config, calib_ids, quant_config, lora_config, key, progress, measure_error)


def qlora_init(
    params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
    lora_config: LoraConfig, *, key: jax.Array, progress: bool = False, measure_error: bool = True,
) -> CalibrationResult:
    """The QLoRA initialisation: RTN quantization, ``a`` kaiming-uniform, ``b = 0``.

    QLoRA stores its base weights in NormalFloat (``quant_config.scheme == "nf"``, the
    registry's default scheme for this method); a uniform scheme gives the uniform-RTN
    variant. Otherwise identical to :func:`rtn_init`.

    Args:
      params, model_config, calib_ids, quant_config, lora_config, key, progress,
        measure_error: as for :func:`rtn_init`.

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (method "qlora").
    """
    return _rtn("qlora", params, model_config, calib_ids, quant_config, lora_config, key, progress, measure_error)
