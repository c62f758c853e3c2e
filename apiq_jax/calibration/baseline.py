"""What the data-free and GPTQ baselines share: their per-block activation errors and result."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from apiq_jax.calibration.blocks import as_float32, embed_ids, float32_view, layer_idx_arg, run_block, stream_error
from apiq_jax.calibration.driver import BlockOutput, frozen_model
from apiq_jax.calibration.reports import CalibrationReport, CalibrationResult, Stopwatch
from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["baseline_result", "streamed_errors"]


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
      is ``||x_fp_i - x_q_i||^2 / ||x_fp_i||^2`` (:func:`streamed_errors`).
    """
    timer = Stopwatch()
    frozen = frozen_model(params, outputs)
    errs: list[float | None] = (
        streamed_errors(params, frozen, lora, ids, model_config) if measure_error else [None] * len(outputs)
    )
    blocks = [dataclasses.replace(o.report, error_after=e) for o, e in zip(outputs, errs)]
    report = CalibrationReport.build(method, quant_config, lora_config, ids.shape, blocks=blocks, seconds=seconds,
                                     options=options, extra={"eval_seconds": timer.elapsed()})
    return CalibrationResult(frozen, lora, report)


def streamed_errors(params: Mapping[str, Any], frozen: Mapping[str, Any], lora: Lora | None, ids: np.ndarray,
                    config: ModelConfig) -> list[float]:
    """Every block's relative activation error, one block of the dense model read at a time.

    The two streams (dense model; frozen model with ``lora``) start from the embeddings and
    go through the blocks in order, in place (two ``[n, seqlen, D]`` caches in the
    embedding's dtype, each block computed in float32); block i's error is
    ``sum ||x_fp_i - x_q_i||^2 / sum ||x_fp_i||^2`` — the quantity of
    :func:`apiq_jax.evaluate.activation_errors`, without holding either model whole.

    Args:
      params: the dense params (layers may be lazily read tensors).
      frozen: the frozen params.
      lora: the frozen model's :class:`~apiq_jax.lora.Lora`, or None.
      ids: the calibration ids ``[n, seqlen]``.
      config: the model config.

    Returns:
      One relative error per block.
    """
    x_fp = embed_ids(params, ids, config)
    x_q = jnp.copy(x_fp)
    errors = []
    for i in range(config.num_hidden_layers):
        li = layer_idx_arg(config, i)
        x_fp = run_block(as_float32(params["layers"][i]), x_fp, config, None, layer_idx=li, consume=True)
        x_q = run_block(float32_view(frozen["layers"][i]), x_q, config, None if lora is None else lora["layers"][i],
                        layer_idx=li, consume=True)
        errors.append(stream_error(x_fp, x_q))
    return errors
