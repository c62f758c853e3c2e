"""What ApiQ-bw and ApiQ-lw share: the starting point, the work directory, the result.

ApiQ (Liao & Monz, EMNLP 2024) initialises the quantized weights ``Q`` and the LoRA factors
``a, b`` *together*, so that the quantized model with LoRA reproduces the full-precision
model's activations, its inputs taken from the already-quantized shallower part of the
network. Both variants walk the blocks in order (:func:`apiq_jax.calibration.driver.run_blocks`)
carrying two streams from the embeddings: ``x_fp`` (the full-precision model) and ``x_q``
(the model quantized so far, LoRA active). Every block starts from the clipping logits at
``clip_init`` and the initial LoRA (QLoRA init, ``lora_init`` factors, or fitted to the
block's ``W - Q0`` by LoftQ's or CLoQ's closed form: ``ApiQOptions.lora_init``), and ends frozen: each
linear quantized once, with its learned logits.

With ``work_dir`` a run is resumable (:class:`~apiq_jax.calibration.workdir.WorkDir`): every
finished block's clip logits and LoRA and the streams after it are saved; re-running the
same call continues after the last finished block, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import apiq_jax.sharding as sharding
from apiq_jax.calibration.blocks import (
    as_float32,
    block_error,
    embed_ids,
    embed_ids_host,
    fake_quant_layer,
    float32_view,
    freeze_layer,
    layer_idx_arg,
    run_block,
    stream_error,
)
from apiq_jax.calibration.cloq import block_grams, block_lora_init
from apiq_jax.calibration.driver import BlockOutput, frozen_model, run_blocks
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationReport, CalibrationResult, Stopwatch
from apiq_jax.calibration.workdir import WorkDir, digest, run_fingerprint
from apiq_jax.lora import LINEARS, Lora, LoraConfig, init_lora_layer, lora_from_factors
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import LazyTensor
from apiq_jax.quant import QuantConfig, init_clip

__all__ = ["ApiQContext", "ApiQStep", "BlockStart", "InitialLora", "calibrate_apiq", "loss_curve"]


@dataclasses.dataclass(frozen=True)
class InitialLora:
    """Where each block's LoRA starts, made one layer at a time (never the whole model's at once).

    Attributes:
      layer: ``layer(i)`` is layer i's starting :class:`~apiq_jax.lora.Lora`.
      digest: identifies the whole starting LoRA (the work directory's fingerprint).
    """

    layer: Callable[[int], Lora]
    digest: str

    @classmethod
    def of(cls, lora: Lora) -> InitialLora:
        """Every block starts from its layer of a model-level ``lora`` (held whole).

        Args:
          lora: a model-level :class:`~apiq_jax.lora.Lora`.

        Returns:
          The :class:`InitialLora`.
        """
        return cls(lambda i: lora["layers"][i], digest(lora))


class BlockStart(NamedTuple):
    """The start of an ApiQ block step (:meth:`ApiQContext.begin`).

    Attributes:
      index: the block index.
      layer_idx: what :func:`~apiq_jax.calibration.blocks.layer_idx_arg` gives for it.
      dense: its params in float32 (on the device; the block's only dense copy).
      dtype: the dtype its weights are stored in (what the frozen block dequantizes to).
      state: its starting ``{"clip", "lora"}`` state.
      t1: the full-precision target ``F_i(x_fp; W)`` (the next ``x_fp``).
      error_before: the relative error of the starting point on ``x_q``.
    """

    index: int
    layer_idx: int | None
    dense: dict[str, Any]
    dtype: str
    state: dict[str, Any]
    t1: jnp.ndarray
    error_before: float


@dataclasses.dataclass(frozen=True)
class ApiQContext:
    """What every ApiQ block step needs besides the block itself.

    Attributes:
      config: the model config.
      qcfg: the quantizer.
      opts: the :class:`~apiq_jax.calibration.options.ApiQOptions`.
      lora0: the initial LoRA, one layer at a time.
    """

    config: ModelConfig
    qcfg: QuantConfig
    opts: ApiQOptions
    lora0: InitialLora

    def begin(self, i: int, layer: Mapping[str, Any], streams: dict[str, Any], *,
              consume_fp: bool = True) -> BlockStart:
        """What both variants compute first for block ``i``.

        Args:
          i: the block index.
          layer: its params (arrays or lazily read tensors; each read once here, straight to
            float32: the block is not also held in its storage dtype).
          streams: ``{"x_fp", "x_q"}`` block inputs ``[n, s, D]``.
          consume_fp: compute ``t1`` in the buffer of ``streams["x_fp"]`` (donated: no
            extra cache); False when the step still needs ``x_fp`` (ApiQ-lw).

        Returns:
          The :class:`BlockStart`: the target ``t1 = F_i(x_fp; W)`` and the error of the
          starting point (clip logits at ``clip_init``, the initial LoRA) on ``x_q``
          (measured on the device, its outputs never stored).
        """
        li = layer_idx_arg(self.config, i)
        dtype = jnp.dtype(layer["q_proj"].dtype).name
        dense = as_float32(layer)
        state = self.start_state(i, layer)
        if (mesh := sharding.placement_mesh()) is not None:  # the training state split like the block (as_float32)
            state = sharding.place(state, mesh)
        if self.opts.lora_init != "default":  # LoftQ/CLoQ start: fitted to this block's W - Q0 (on x_q)
            state["lora"] = self.fitted_lora(i, dense, state, streams["x_q"], li)
        t1 = run_block(dense, streams["x_fp"], self.config, None, layer_idx=li, consume=consume_fp)
        error = block_error(fake_quant_layer(dense, state["clip"], self.qcfg), streams["x_q"], t1, self.config,
                            state["lora"], layer_idx=li)
        return BlockStart(i, li, dense, dtype, state, t1, error)

    def freeze(self, start: BlockStart, clips: Mapping[str, Any], targets: Any = LINEARS) -> dict[str, Any]:
        """Quantize ``targets`` of the block once, from its float32 weights (the layer is not read again).

        Args:
          start: the block's :class:`BlockStart` (its ``dense`` weights are quantized).
          clips: the learned clipping logits per linear.
          targets: the linears to quantize now.

        Returns:
          ``{name: QuantizedTensor}`` for ``targets``, dequantizing to the storage dtype.
        """
        return freeze_layer({n: start.dense[n] for n in targets}, self.qcfg, clips, targets=targets,
                            where=f"layers.{start.index}", dtype=start.dtype)

    def end(self, start: BlockStart, frozen: dict[str, Any], train: dict[str, Any], x_q: jnp.ndarray,
            losses: tuple[float, ...], extra: Mapping[str, Any]) -> BlockOutput:
        """Propagate ``x_q`` through the frozen block (trained LoRA active) and report.

        Args:
          start: the block's :class:`BlockStart`.
          frozen: the block with every linear quantized (once).
          train: the trained ``{"clip", "lora"}`` state.
          x_q: the block's quantized-stream input (consumed: its buffer receives the output).
          losses: the report's loss curve.
          extra: the report's method-specific values.

        Returns:
          The :class:`~apiq_jax.calibration.driver.BlockOutput` with streams ``x_fp = t1`` and
          ``x_q = F_i(x_q; Q, a, b)``.
        """
        x_q = run_block(float32_view(frozen), x_q, self.config, train["lora"], layer_idx=start.layer_idx, consume=True)
        report = BlockReport(index=start.index, error_before=start.error_before,
                             error_after=stream_error(start.t1, x_q), loss_curve=losses, extra=extra)
        return BlockOutput(frozen=frozen, report=report, lora=train["lora"], streams={"x_fp": start.t1, "x_q": x_q},
                           state=train)

    def fitted_lora(self, i: int, dense: Mapping[str, Any], state: Mapping[str, Any], x_q: jnp.ndarray,
                    layer_idx: int | None) -> Lora:
        """Block ``i``'s LoRA fitted to its starting quantization error (``opts.lora_init`` "loftq"/"cloq").

        Args:
          i: the block index.
          dense: its float32 params.
          state: its starting state (the clip logits give ``Q0``; the LoRA gives the targets).
          x_q: the block's quantized-stream inputs (CLoQ's ``X``).
          layer_idx: see :func:`~apiq_jax.calibration.blocks.layer_idx_arg`.

        Returns:
          The float32 :class:`~apiq_jax.lora.Lora` of :func:`~apiq_jax.calibration.cloq.block_lora_init`.
        """
        lora = state["lora"]
        names = [n for n in LINEARS if n in lora.factors]
        base = fake_quant_layer({n: dense[n] for n in names}, {n: state["clip"][n] for n in names}, self.qcfg)
        grams = block_grams(dense, x_q, self.config, layer_idx, names) if self.opts.lora_init == "cloq" else None
        factors = block_lora_init(self.opts.lora_init, dense, base, lora.config, grams=grams, where=f"layers.{i}")
        return lora.replace(factors)

    def start_state(self, i: int, layer: Mapping[str, Any]) -> dict[str, Any]:
        """Block ``i``'s starting point (also the template its checkpoint is restored into).

        Args:
          i: the block index.
          layer: its dense params.

        Returns:
          ``{"clip": {name: ClipLogits at clip_init}, "lora": the initial Lora in float32}``.
        """
        return {
            "clip": {n: init_clip(layer[n].shape, self.qcfg, self.opts.clip_init) for n in LINEARS},
            "lora": self.lora0.layer(i).astype(jnp.float32),
        }


#: ``step(ctx, i, layer, streams, bar) -> BlockOutput`` with streams ``{"x_fp", "x_q"}``
ApiQStep = Callable[[ApiQContext, int, Mapping[str, Any], dict[str, jnp.ndarray], Progress], BlockOutput]


def calibrate_apiq(
    method: str, step: ApiQStep, params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any,
    quant_config: QuantConfig, lora_config: LoraConfig, *, key: jax.Array | None, opts: ApiQOptions,
    lora_init: Mapping[str, Any] | None, work_dir: str | os.PathLike | None, progress: bool,
    on_block_end: Callable[[int, BlockReport], None] | None, lazy_result: bool = False,
    offload_activations: bool = False,
) -> CalibrationResult:
    """Run an ApiQ variant: validate, start (or resume) the streams, loop the blocks, assemble.

    Args:
      method: "apiq-bw" or "apiq-lw".
      step: the variant's block step.
      lazy_result: with ``work_dir``, the result's LoRA factors and clipping logits stay on
        disk (:class:`~apiq_jax.models.hf_io.LazyTensor` leaves, read when converted; write
        them with ``save_quantized`` before the work directory goes, or ``materialize``
        them) instead of being read back: memory then holds only the packed model.
      offload_activations: the streams are host arrays, streamed to the device (ApiQ-bw only).
      params, model_config, calib_ids, quant_config, lora_config, key, lora_init, work_dir,
        progress, on_block_end: see :func:`apiq_jax.calibration.apiq_bw.apiq_bw`.
      opts: the options.

    Returns:
      The :class:`~apiq_jax.calibration.reports.CalibrationResult` (``extras["clip"]``:
      ``{"layers": [{name: ClipLogits}]}``).
    """
    if not isinstance(opts, ApiQOptions):
        raise ValueError(f"options must be an apiq_jax.calibration.ApiQOptions, got {opts!r}")
    ids = validate_inputs(method, params, model_config, calib_ids, quant_config, lora_config)
    opts.check_batching(ids.shape[0])
    if offload_activations and method != "apiq-bw":
        raise ValueError(f"offloading the activations is supported by apiq-bw, not {method}")
    timer = Stopwatch()
    ctx = ApiQContext(model_config, quant_config, opts, _initial_lora(params, lora_config, key, lora_init, opts))
    if offload_activations:  # host arrays: every pass streams them through the device
        x0 = embed_ids_host(params, ids, model_config, opts.cache_dtype)
        streams = {"x_fp": x0, "x_q": x0.copy()}
    else:
        x0 = embed_ids(params, ids, model_config)
        x0 = x0.astype(opts.cache_dtype or x0.dtype)
        streams = {"x_fp": x0, "x_q": jnp.copy(x0)}  # two buffers: the steps write into them in place
    del x0
    wd = done = None
    if work_dir is not None:
        wd = WorkDir(work_dir, run_fingerprint(method, model_config, quant_config, lora_config, opts, ids, params,
                                               ctx.lora0.digest))
    # with a work directory, a finished block's LoRA and clip logits live there until the end
    keep = None if wd is None else (lambda out: dataclasses.replace(out, lora=None, state=None))
    try:
        if wd is not None:
            done, streams = _resume(wd, ctx, params["layers"], streams)
            done = [keep(o) for o in done]
        save = None if wd is None else (lambda i, out: wd.save(i, out.state, out.streams, out.report))
        outputs = run_blocks(partial(step, ctx), params["layers"], streams, desc=method, done=done or (),
                             save=save, progress=progress, on_block_end=on_block_end, keep=keep,
                             materialize_layers=False)  # begin() reads each tensor straight to float32
        del streams
        if wd is not None:
            read = wd.lazy_state if lazy_result else wd.restore_state
            outputs = [dataclasses.replace(o, state=read(i, ctx.start_state(i, params["layers"][i])))
                       for i, o in enumerate(outputs)]
            outputs = [dataclasses.replace(o, lora=o.state["lora"]) for o in outputs]
    finally:
        if wd is not None:
            wd.close()
    extra = {"resumed_from_block": len(done or ()), "work_dir": None if work_dir is None else str(work_dir)}
    report = CalibrationReport.build(method, quant_config, lora_config, ids.shape,
                                     blocks=[o.report for o in outputs], seconds=timer.elapsed(),
                                     options=opts.to_dict(), extra=extra)
    if wd is not None and sharding.is_primary():
        report.save_json(wd.path / "report.json")
        report.save_plot(wd.path / "report.png")
    return _result(params, ctx, lora_config, outputs, report)


def _initial_lora(params: Mapping[str, Any], lora_config: LoraConfig, key: jax.Array | None,
                  lora_init: Mapping[str, Any] | None, opts: ApiQOptions) -> InitialLora:
    if lora_init is not None:
        if opts.lora_init != "default":
            raise ValueError(f"lora_init= factors and options.lora_init={opts.lora_init!r} both given; pass one")
        return InitialLora.of(lora_from_factors(params, lora_config, lora_init))
    if opts.lora_init != "default" and key is None:  # the template of the fitted factors: its values are replaced
        key = jax.random.PRNGKey(0)
    if key is None:
        raise ValueError("key= (a jax.random key) is required to initialise the LoRA factors")
    init_lora_layer(params, lora_config, key, 0, method="qlora")  # a bad config fails here, before any work
    return InitialLora(partial(init_lora_layer, params, lora_config, key, method="qlora"),
                       digest({"qlora_key": jax.random.key_data(key)}))


def _resume(wd: WorkDir, ctx: ApiQContext, layers: Any, streams: dict[str, Any]) -> tuple[list[BlockOutput], Any]:
    """The blocks a previous run finished (frozen once from their saved logits) and the streams after them."""
    start = wd.next_block()
    reports = wd.reports()
    done = []
    for i in range(start):
        state = wd.restore_state(i, ctx.start_state(i, layers[i]))
        frozen = freeze_layer(layers[i], ctx.qcfg, state["clip"])
        done.append(BlockOutput(frozen=frozen, report=reports[i], lora=state["lora"], state=state))
    if start:
        streams = wd.restore_streams(start - 1, streams)
    return done, streams


def _result(params: Mapping[str, Any], ctx: ApiQContext, lora_config: LoraConfig, outputs: list[BlockOutput],
            report: CalibrationReport) -> CalibrationResult:
    lora_layers = []
    for i, o in enumerate(outputs):
        start = jax.eval_shape(lambda i=i: ctx.lora0.layer(i))  # its factors' dtypes are the result's (not re-made)
        lora_layers.append({n: {k: _as_dtype(v, start[n][k].dtype) for k, v in o.lora[n].factors.items()}
                            for n in lora_config.targets})
    clips = {"layers": [{n: o.state["clip"][n] for n in LINEARS} for o in outputs]}
    return CalibrationResult(frozen_model(params, outputs), Lora({"layers": lora_layers}, lora_config), report,
                             {"clip": clips})


def _as_dtype(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``; a lazily read tensor stays lazy (it is read in ``dtype``)."""
    if isinstance(x, LazyTensor):
        return LazyTensor(x.path, x.key, x.shape, dtype)
    return x.astype(dtype)


def loss_curve(losses: Any) -> tuple[float, ...]:
    """A ``[epochs, n_batches]`` loss array as the flat float64 curve a report stores.

    Args:
      losses: the per-step losses.

    Returns:
      A tuple of floats.
    """
    return tuple(np.asarray(losses, np.float64).reshape(-1).tolist())
