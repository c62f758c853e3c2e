"""What the data-free and GPTQ baselines share: their per-block activation errors and result."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from apiq_jax.calibration.driver import BlockOutput, frozen_model
from apiq_jax.calibration.reports import CalibrationReport, CalibrationResult, Stopwatch
from apiq_jax.evaluate import activation_errors
from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["baseline_result"]


def baseline_result(
    method: str,
    params: Mapping[str, Any],
    outputs: Sequence[BlockOutput],
    lora: Lora,
    ids: np.ndarray,
    model_config: ModelConfig,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    seconds: float,
    options: Mapping[str, Any],
    measure_error: bool = True,
) -> CalibrationResult:
    """The result of a baseline, with every block's activation error on the calibration ids.

    Args:
      method: registry name.
      params: the dense params.
      outputs: one :class:`~apiq_jax.calibration.driver.BlockOutput` per layer.
      lora: the LoRA of the whole model.
      ids: the calibration ids ``[n, seqlen]``.
      model_config, quant_config, lora_config: the configs used.
      seconds: the method's own wall time (the error evaluation after it is
        ``report.extra["eval_seconds"]``).
      options: the method's options (JSON-able).
      measure_error: evaluate the errors (else they are None).

    Returns:
      The :class:`~apiq_jax.calibration.reports.CalibrationResult`; block i's ``error_after``
      is ``||x_fp_i - x_q_i||^2 / ||x_fp_i||^2`` (:func:`apiq_jax.evaluate.activation_errors`).
    """
    timer = Stopwatch()
    frozen = frozen_model(params, outputs)
    errs: list[float | None] = (
        list(activation_errors(params, frozen, ids, config=model_config, lora=lora)) if measure_error
        else [None] * len(outputs)
    )
    blocks = [dataclasses.replace(o.report, error_after=e) for o, e in zip(outputs, errs)]
    report = CalibrationReport.build(method, quant_config, lora_config, ids.shape, blocks=blocks, seconds=seconds,
                                     options=options, extra={"eval_seconds": timer.elapsed()})
    return CalibrationResult(frozen, lora, report)
