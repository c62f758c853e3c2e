"""GPTQ-LoRA: every linear GPTQ-quantized with the Hessians of its calibration inputs, then the QLoRA init.

Sequential like the reference (``llama.py --true-sequential``): the calibration embeddings
flow through the model block by block; in block i the inputs of each linear come from the
model whose blocks before i are already quantized (``x_q``), and within the block the
stages of :data:`~apiq_jax.calibration.stages.STAGES` are quantized in order, each stage's
inputs taken from the block with the earlier stages already quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.calibration.baseline import baseline_result
from apiq_jax.calibration.blocks import embed_ids, layer_idx_arg, run_block
from apiq_jax.calibration.driver import BlockOutput, run_blocks
from apiq_jax.calibration.gptq_core import check_gptq_config, gptq_matrix
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult, Stopwatch
from apiq_jax.calibration.stages import STAGES, stage_input
from apiq_jax.lora import LoraConfig, init_lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["gptq_init", "gptq_step", "stage_hessian"]


@partial(jax.jit, static_argnames=("config", "stage", "layer_idx"))
def stage_hessian(layer: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, stage: int,
                  layer_idx: int | None = None) -> jnp.ndarray:
    """GPTQ Hessian of the input of ``STAGES[stage]`` over the samples of ``xs``.

    Args:
      layer: the layer's dict (earlier stages already replaced by their quantized values).
      xs: block inputs ``[n, s, D]``.
      config: the model config (static).
      stage: index into :data:`~apiq_jax.calibration.stages.STAGES` (static).
      layer_idx: see :func:`apiq_jax.models.llama.block_forward` (static).

    Returns:
      ``2/n sum_s X_s^T X_s`` ``[in, in]`` (float32).
    """

    def body(h, x):
        inp = stage_input(layer, x[None], config, stage, None, layer_idx)[0].astype(jnp.float32)
        return h + inp.T @ inp, None

    in_dim = layer[STAGES[stage].linears[0]].shape[1]
    h, _ = jax.lax.scan(body, jnp.zeros((in_dim, in_dim), jnp.float32), xs)
    return h * (2.0 / xs.shape[0])


def gptq_step(
    quant_config: QuantConfig, config: ModelConfig, options: Mapping[str, Any], i: int, layer: Mapping[str, Any],
    x_q: jnp.ndarray, bar: Progress,
) -> BlockOutput:
    """GPTQ on block ``i`` (a block step whose stream is ``x_q``).

    Args:
      quant_config: the quantizer.
      config: the model config.
      options: ``percdamp``, ``true_sequential``, ``static_groups``.
      i: the block index.
      layer: its dense params.
      x_q: the block's inputs in the model quantized so far ``[n, s, D]``.
      bar: unused.

    Returns:
      The frozen block, ``x_q`` after it and a report with ``extra["gptq_loss"]`` per linear.
    """
    del bar
    li = layer_idx_arg(config, i)
    work = dict(layer)  # dense weights, quantized stages replaced by their w_hat
    frozen = dict(layer)
    losses: dict[str, float] = {}
    hessians = None
    if not options["true_sequential"]:  # every Hessian from the full-precision block
        hessians = [stage_hessian(layer, x_q, config, s, li) for s in range(len(STAGES))]
    for s, (_, names) in enumerate(STAGES):
        h = stage_hessian(work, x_q, config, s, li) if hessians is None else hessians[s]
        for name in names:
            res = gptq_matrix(layer[name], h, quant_config, percdamp=float(options["percdamp"]),
                              static_groups=options["static_groups"])
            frozen[name] = res.q
            work[name] = res.w_hat.astype(layer[name].dtype)
            losses[name] = float(res.loss)
    x_q = run_block(work, x_q, config, None, layer_idx=li)
    return BlockOutput(frozen=frozen, report=BlockReport(i, extra={"gptq_loss": losses}), streams=x_q)


def gptq_init(params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
              lora_config: LoraConfig, *, key: jax.Array, progress: bool = False, percdamp: float = 0.01,
              true_sequential: bool = True, static_groups: bool = False,
              measure_error: bool = True) -> CalibrationResult:
    """GPTQ-quantized base model with the QLoRA init on top (GPTQ-LoRA).

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n, seqlen]`` (the Hessians' inputs).
      quant_config: the quantizer (bits 2, 3 or 4; "asym", "sym" or "nf"; no double quantization).
      lora_config: LoRA rank/alpha/targets (``a`` kaiming-uniform, ``b = 0``).
      key: PRNG key of the LoRA init.
      progress: show a bar over the blocks.
      percdamp: dampening, a fraction of the mean Hessian diagonal, in ``[0, 1)``.
      true_sequential: stage by stage within a block (else all seven Hessians come from the
        full-precision block).
      static_groups: group constants from the original weights (see
        :func:`~apiq_jax.calibration.gptq_core.gptq_matrix`).
      measure_error: evaluate the per-block activation errors (skip with False).

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (method "gptq").

    Raises:
      ValueError: a double-quantized config, a bad ``percdamp`` or invalid inputs.
    """
    ids = validate_inputs("gptq", params, model_config, calib_ids, quant_config, lora_config)
    check_gptq_config(quant_config)
    if not (isinstance(percdamp, (int, float)) and 0 <= percdamp < 1):
        raise ValueError(f"percdamp={percdamp!r} must be a number in [0, 1)")
    timer = Stopwatch()
    options = {"percdamp": percdamp, "true_sequential": true_sequential, "static_groups": static_groups}
    step = partial(gptq_step, quant_config, model_config, options)
    outputs = run_blocks(step, params["layers"], embed_ids(params, ids, model_config), desc="gptq",
                         progress=progress)
    lora = init_lora(params, lora_config, key, method="qlora")
    return baseline_result("gptq", params, outputs, lora, ids, model_config, quant_config, lora_config,
                           seconds=timer.elapsed(), options=options, measure_error=measure_error)
