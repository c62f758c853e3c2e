"""ApiQ-bw (block-wise), exactly the reference ``calibrate()``: :func:`apiq_bw`.

For block i, with the streams ``x_fp`` and ``x_q`` (see :mod:`apiq_jax.calibration.apiq`):

1. Targets with the block in full precision: ``t1 = F_i(x_fp; W)``, ``t2 = F_i(x_q; W)``
   (with ``aug_loss``); ``x_fp <- t1``.
2. Train every LoRA ``a, b`` of the block and every clipping logit (the dense ``W`` stays
   frozen) on the loss of :mod:`apiq_jax.calibration.apiq_bw_core`: AdamW in two groups,
   batch 1, ``epochs`` passes over the samples in fixed order, fresh optimizer state per
   block, the whole optimisation one compiled program.
3. Freeze (quantize once into :class:`~apiq_jax.quant.QuantizedTensor`) and propagate
   ``x_q <- F_i(x_q; Q, a, b)`` through that frozen block with the trained LoRA active.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from apiq_jax.calibration.apiq import ApiQContext, calibrate_apiq, loss_curve
from apiq_jax.calibration.apiq_bw_core import train_block_bw, train_block_bw_streamed
from apiq_jax.calibration.blocks import run_block, with_quantized
from apiq_jax.calibration.driver import BlockOutput
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult
from apiq_jax.lora import LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

__all__ = ["apiq_bw", "bw_step"]


def bw_step(ctx: ApiQContext, i: int, layer: Mapping[str, Any], streams: dict[str, Any], bar: Progress) -> BlockOutput:
    """Calibrate block ``i`` with ApiQ-bw: an :data:`~apiq_jax.calibration.apiq.ApiQStep`.

    Args:
      ctx, i, layer, streams, bar: see :data:`~apiq_jax.calibration.apiq.ApiQStep`.

    Returns:
      The frozen block, its trained LoRA and the streams after it; its report has the loss of
      every step and ``extra["loss_terms"]`` (the two terms of each).
    """
    start = ctx.begin(i, layer, streams)
    bar.start_inner(f"block {i}", ctx.opts.epochs)
    x_q = streams["x_q"]
    t2 = run_block(start.dense, x_q, ctx.config, None, layer_idx=start.layer_idx) if ctx.opts.aug_loss else None
    static = {"config": ctx.config, "qcfg": ctx.qcfg, "opts": ctx.opts, "layer_idx": start.layer_idx}
    if isinstance(x_q, np.ndarray):  # offloaded caches: every batch goes to the device for its own step
        train, losses, terms = train_block_bw_streamed(start.dense, start.state, x_q, start.t1, t2, bar.epoch_done,
                                                       **static)
    else:
        train, losses, terms = train_block_bw(start.dense, start.state, x_q, start.t1, t2, bar.token(), **static)
    del t2  # the next cache to go: the propagation below writes into x_q's own buffer
    frozen = with_quantized(layer, ctx.freeze(start, train["clip"]))
    extra = {"loss_terms": np.asarray(terms, np.float64).reshape(-1, 2).tolist()}
    return ctx.end(start, frozen, train, x_q, loss_curve(losses), extra)


def apiq_bw(params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
            lora_config: LoraConfig, *, key: jax.Array | None = None, options: ApiQOptions = ApiQOptions(),
            lora_init: Mapping[str, Any] | None = None, work_dir: str | os.PathLike | None = None,
            progress: bool = False,
            on_block_end: Callable[[int, BlockReport], None] | None = None,
            lazy_result: bool = False, offload_activations: bool = False) -> CalibrationResult:
    """ApiQ-bw calibration (block-wise), as in the reference ``calibrate()``.

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n_samples, seqlen]`` (any count and length).
      quant_config: quantization config (e.g. ``QuantConfig(2, 64)``); all seven linears of
        every layer are quantized. Bits 2, 3 or 4, scheme "asym", "sym" or "nf" (the
        clipping logits shrink each group's range; on NF, its absmax scale)
        (:data:`~apiq_jax.calibration.registry.METHODS`).
      lora_config: LoRA rank/alpha/targets.
      key: PRNG key for the QLoRA init of ``a`` (unused when ``lora_init`` is given).
      options: epochs, learning rates, weight decays, batch size, clip init
        (:class:`~apiq_jax.calibration.options.ApiQOptions`; the reference's by default).
      lora_init: optional initial LoRA (tree or flat factors, see
        :func:`apiq_jax.lora.lora_from_factors`) instead of the QLoRA init.
      work_dir: directory for per-block checkpoints, ``report.json`` and ``report.png``;
        re-running the same call resumes after the last finished block.
      progress: show tqdm bars (blocks, and epochs with the running loss).
      on_block_end: called as ``on_block_end(i, block_report)`` after block i is finished
        (and checkpointed).
      lazy_result: with ``work_dir``, leave the result's LoRA and clipping logits in the work
        directory as lazily read tensors (save them before deleting it): memory then holds
        only the packed model (what ``apiq-jax quantize`` does).
      offload_activations: keep the activation caches on the host and stream them to the
        device a batch (training) or a chunk of samples (the block's passes) at a time, for
        caches larger than device memory (``--offload-activations``); same steps, same result
        up to float rounding.

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult`: frozen params with
      QuantizedTensor linears, the LoRA, the report, and ``extras["clip"]``.

    Raises:
      ValueError: invalid inputs or options (the message names the value).

    Example (a tiny random model, one epoch, a few seconds on CPU):

    >>> import jax, numpy as np
    >>> from apiq_jax.calibration import ApiQOptions, apiq_bw
    >>> from apiq_jax.lora import LoraConfig
    >>> from apiq_jax.models import ModelConfig
    >>> from apiq_jax.models.llama import init_params
    >>> from apiq_jax.quant import QuantConfig
    >>> cfg = ModelConfig("LlamaForCausalLM", 64, 32, 64, 2, 2, 1, 16)
    >>> params = init_params(cfg, jax.random.PRNGKey(0))
    >>> ids = np.random.RandomState(0).randint(0, 64, size=(2, 8))
    >>> res = apiq_bw(params, cfg, ids, QuantConfig(bits=2, group_size=32), LoraConfig(rank=4, alpha=8),
    ...               key=jax.random.PRNGKey(1), options=ApiQOptions(epochs=1))
    >>> res.params["layers"][0]["q_proj"].bits, res.lora.scale, len(res.report.blocks)
    (2, 2.0, 2)
    >>> all(b.error_after < b.error_before for b in res.report.blocks)
    True
    """
    return calibrate_apiq(
        "apiq-bw", bw_step, params, model_config, calib_ids, quant_config, lora_config, key=key, opts=options,
        lora_init=lora_init, work_dir=work_dir, progress=progress, on_block_end=on_block_end,
        lazy_result=lazy_result, offload_activations=offload_activations,
    )

