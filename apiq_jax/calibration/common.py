"""Shared contract and helpers of every calibration method (ApiQ-bw/-lw and the baselines).

Every method has the same signature and returns the same type::

    def method(
        params,            # dense params pytree of the full-precision model (apiq_jax.models.llama layout)
        model_config,      # apiq_jax.models.ModelConfig
        calib_ids,         # int token ids [n_samples, seqlen] (numpy or jax), any n >= 1, seqlen >= 1
        quant_config,      # apiq_jax.quant.QuantConfig (bits, group size, scheme, ...)
        lora_config,       # apiq_jax.lora.LoraConfig (rank, alpha, targets)
        *,
        key,               # jax PRNG key (LoRA init; methods that need no randomness ignore it)
        progress=False,    # tqdm bars where the method has long loops
        **method_options,  # method-specific keyword options (documented by each method)
    ) -> CalibrationResult

* ``CalibrationResult.params`` is the *frozen* model: the same pytree with every
  quantized linear (:data:`QUANT_TARGETS`, i.e. all seven linears of every layer)
  replaced by a :class:`~apiq_jax.quant.QuantizedTensor`; embeddings, norms and head are
  unchanged (shared, not copied).
* ``CalibrationResult.lora`` is a :class:`~apiq_jax.lora.Lora` (factors
  ``{"layers": [{name: {"a": [in, r], "b": [r, out]}}]}`` over ``lora_config.targets``,
  carrying ``lora_config``); the model computes ``x @ W_hat.T + lora.scale * (x @ a) @ b``.
  Feed both to :func:`apiq_jax.models.quantized.apply` / :func:`apiq_jax.models.llama.forward`.
* ``CalibrationResult.report`` is a :class:`CalibrationReport` (JSON-able via
  ``to_dict``/``save_json``, optional PNG via ``save_plot``).

Helpers every method should reuse:

* :func:`validate_inputs` — checks params/ids/configs, raises ValueError naming the bad value
  (ids out of vocab, empty calibration set, a group size larger than a linear's input, ...).
* :func:`freeze_layer` / :func:`freeze_params` — dense weights (+ optional clip logits) to
  QuantizedTensor leaves.
* :func:`embed_ids`, :func:`run_block`, :func:`block_errors` — embeddings of the calibration
  set, one decoder block applied sample by sample (one jit program), and the per-block
  relative activation error ``||x_fp - x_q||^2 / ||x_fp||^2`` of a quantized model
  (full-precision and quantized streams propagated side by side).
* :func:`memory_stats`, :class:`Stopwatch` — peak host RSS and device memory for reports.

A baseline typically does::

    ids = validate_inputs(params, model_config, calib_ids, quant_config, lora_config)
    t = Stopwatch()
    frozen = freeze_params(params, quant_config)
    lora = init_lora(params, lora_config, key)
    errs = block_errors(params, frozen, lora, ids, model_config)
    report = CalibrationReport.build("rtn", quant_config, lora_config, ids.shape,
                                     blocks=[BlockReport(i, error_after=e) for i, e in enumerate(errs)],
                                     seconds=t.elapsed())
    return CalibrationResult(frozen, lora, report)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.evaluate import activation_errors, relative_error
from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import LINEARS, block_forward, embed, is_quantized, linear_shapes
from apiq_jax.models.quantized import quantize_params
from apiq_jax.quant import QuantConfig, quantize

__all__ = [
    "QUANT_TARGETS", "BlockReport", "CalibrationMethod", "CalibrationReport", "CalibrationResult",
    "Stopwatch", "block_errors", "embed_ids", "freeze_layer", "freeze_params", "memory_stats",
    "relative_error", "run_block", "validate_inputs",
]

#: Linears quantized by every calibration method (all seven of every decoder layer).
QUANT_TARGETS: tuple[str, ...] = tuple(LINEARS)


# --- result types ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockReport:
    """What happened to one decoder block.

    Attributes:
      index: block index.
      error_before: relative activation error ``||x_fp - x_q||^2 / ||x_fp||^2`` of the
        block's output at the method's starting point (ApiQ: plain RTN, clip logits at
        their init and LoRA ``b = 0``), on the calibration stream; None when not measured.
      error_after: the same after the method (quantized weights + final LoRA).
      loss_curve: per-step training loss (empty for methods without training).
      seconds: wall time spent on this block.
      extra: method-specific JSON-able values.
    """

    index: int
    error_before: float | None = None
    error_after: float | None = None
    loss_curve: tuple[float, ...] = ()
    seconds: float = 0.0
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = dataclasses.asdict(self)
        d["loss_curve"] = [float(x) for x in self.loss_curve]
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockReport":
        """Inverse of :meth:`to_dict`."""
        return cls(
            index=int(d["index"]), error_before=d.get("error_before"), error_after=d.get("error_after"),
            loss_curve=tuple(float(x) for x in d.get("loss_curve", ())), seconds=float(d.get("seconds", 0.0)),
            extra=dict(d.get("extra", {})),
        )


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """Summary of one calibration run (JSON-able).

    Attributes:
      method: registry name ("apiq-bw", "rtn", ...).
      quant_config, lora_config: the configs as dicts.
      calib_shape: ``(n_samples, seqlen)`` of the calibration ids.
      blocks: one :class:`BlockReport` per decoder block, in order.
      seconds: total wall time.
      peak_rss_mb: peak resident host memory of the process (MiB) at the end of the run.
      device_peak_bytes: peak device memory (``jax`` memory stats) when the backend reports
        it, else None.
      options: the method options used (JSON-able values).
      extra: anything else method-specific.
    """

    method: str
    quant_config: Mapping[str, Any]
    lora_config: Mapping[str, Any]
    calib_shape: tuple[int, int]
    blocks: tuple[BlockReport, ...] = ()
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    device_peak_bytes: int | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        method: str,
        quant_config: QuantConfig,
        lora_config: LoraConfig,
        calib_shape: Sequence[int],
        *,
        blocks: Sequence[BlockReport] = (),
        seconds: float = 0.0,
        options: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> "CalibrationReport":
        """Report with configs serialised and memory statistics taken now."""
        mem = memory_stats()
        return cls(
            method=method,
            quant_config=dataclasses.asdict(quant_config),
            lora_config=lora_config.to_dict(),
            calib_shape=(int(calib_shape[0]), int(calib_shape[1])),
            blocks=tuple(blocks),
            seconds=float(seconds),
            peak_rss_mb=mem["peak_rss_mb"],
            device_peak_bytes=mem["device_peak_bytes"],
            options=_jsonable(dict(options or {})),
            extra=_jsonable(dict(extra or {})),
        )

    @property
    def errors_before(self) -> list[float | None]:
        """Per-block activation error at the starting point."""
        return [b.error_before for b in self.blocks]

    @property
    def errors_after(self) -> list[float | None]:
        """Per-block activation error of the result."""
        return [b.error_after for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        d = dataclasses.asdict(self)
        d["blocks"] = [b.to_dict() for b in self.blocks]
        d["calib_shape"] = list(self.calib_shape)
        d["quant_config"] = dict(self.quant_config)
        d["lora_config"] = dict(self.lora_config)
        d["options"] = dict(self.options)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationReport":
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=d["method"], quant_config=dict(d["quant_config"]), lora_config=dict(d["lora_config"]),
            calib_shape=tuple(d["calib_shape"]), blocks=tuple(BlockReport.from_dict(b) for b in d["blocks"]),
            seconds=float(d.get("seconds", 0.0)), peak_rss_mb=d.get("peak_rss_mb"),
            device_peak_bytes=d.get("device_peak_bytes"), options=dict(d.get("options", {})),
            extra=dict(d.get("extra", {})),
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def save_plot(self, path: str | os.PathLike) -> Path | None:
        """PNG with the loss curve of every block and the per-block activation errors.

        Returns None (and writes nothing) when matplotlib is not importable.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover - matplotlib is optional
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
        for b in self.blocks:
            if b.loss_curve:
                ax0.plot(np.arange(len(b.loss_curve)), b.loss_curve, label=f"block {b.index}", lw=1)
        ax0.set_xlabel("step")
        ax0.set_ylabel("loss")
        ax0.set_yscale("log")
        ax0.set_title(f"{self.method}: training loss per block")
        if any(b.loss_curve for b in self.blocks) and len(self.blocks) <= 12:
            ax0.legend(fontsize=7)
        idx = [b.index for b in self.blocks]
        before = [np.nan if b.error_before is None else b.error_before for b in self.blocks]
        after = [np.nan if b.error_after is None else b.error_after for b in self.blocks]
        if not all(math.isnan(x) for x in before):
            ax1.plot(idx, before, "o-", label="before")
        ax1.plot(idx, after, "o-", label="after")
        ax1.set_xlabel("block")
        ax1.set_ylabel("||x_fp - x_q||^2 / ||x_fp||^2")
        ax1.set_yscale("log")
        ax1.set_title("activation error")
        ax1.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Output of every calibration method.

    Attributes:
      params: the frozen model params: quantized linears are QuantizedTensor leaves.
      lora: the :class:`~apiq_jax.lora.Lora` (``lora_config.targets`` of every layer).
      report: the :class:`CalibrationReport`.
      extras: optional method-specific arrays (ApiQ: the learned clipping logits as
        ``{"clip": {"layers": [{name: (gamma, beta)}]}}``); empty by default.
    """

    params: Mapping[str, Any]
    lora: Lora
    report: CalibrationReport
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class CalibrationMethod(Protocol):
    """Signature shared by every registered calibration method."""

    def __call__(
        self,
        params: Mapping[str, Any],
        model_config: ModelConfig,
        calib_ids: Any,
        quant_config: QuantConfig,
        lora_config: LoraConfig,
        *,
        key: jax.Array,
        **method_options: Any,
    ) -> CalibrationResult: ...


# --- validation ------------------------------------------------------------------------------
def validate_inputs(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
) -> np.ndarray:
    """Check the common arguments and return the ids as int32 numpy ``[n, seqlen]``.

    Raises ValueError naming the bad value: wrong config types, a params tree whose linears
    are not dense ``[out, in]`` arrays of the config's shapes, ids that are not integers
    ``[n, seqlen]``, an empty calibration set, ids outside ``[0, vocab_size)``, and group
    sizes larger than the input width of a quantized linear.
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(quant_config, QuantConfig):
        raise ValueError(
            f"quant_config must be an apiq_jax.quant.QuantConfig, got {quant_config!r}"
        )
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"lora_config must be an apiq_jax.lora.LoraConfig, got {lora_config!r}")
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError("params must be the model params dict (with a 'layers' list)")
    if len(params["layers"]) != model_config.num_hidden_layers:
        raise ValueError(
            f"params have {len(params['layers'])} layers but model_config.num_hidden_layers="
            f"{model_config.num_hidden_layers}"
        )
    shapes = linear_shapes(model_config)
    for i, layer in enumerate(params["layers"]):
        for name in QUANT_TARGETS:
            w = layer.get(name)
            if w is None:
                raise ValueError(f"params layers.{i} has no linear {name!r}")
            if is_quantized(w):
                raise ValueError(
                    f"params layers.{i}.{name} is already quantized; calibration needs the dense "
                    "full-precision weights"
                )
            if tuple(w.shape) != shapes[name]:
                raise ValueError(f"params layers.{i}.{name} has shape {tuple(w.shape)}; expected {shapes[name]}")
    gs = quant_config.group_size
    if gs is not None:
        for name, (_, in_f) in shapes.items():
            if gs > in_f:
                raise ValueError(
                    f"group_size={gs} is larger than the input width {in_f} of {name} in this model; "
                    f"accepted: a group size <= {min(s[1] for s in shapes.values())} (or None for one "
                    "group per row)"
                )
    if isinstance(calib_ids, (list, tuple)) and len(calib_ids) == 0:
        raise ValueError("the calibration set is empty (0 samples); give at least one row of token ids")
    arr = np.asarray(calib_ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"calibration ids must have shape [n_samples, seqlen], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"the calibration set is empty (ids of shape {arr.shape}); give at least one row of token ids"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"calibration ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= model_config.vocab_size:
        bad = lo if lo < 0 else hi
        row, col = (int(v) for v in np.argwhere(arr == bad)[0])
        raise ValueError(
            f"calibration token id {bad} (sample {row}, position {col}) is out of range; accepted: "
            f"0 <= id < {model_config.vocab_size} (vocab_size)"
        )
    return arr.astype(np.int32)


# --- freezing --------------------------------------------------------------------------------
def freeze_layer(
    layer_params: Mapping[str, Any],
    quant_config: QuantConfig,
    clips: Mapping[str, tuple[jnp.ndarray, jnp.ndarray]] | None = None,
    targets: Sequence[str] = QUANT_TARGETS,
) -> dict[str, Any]:
    """One layer with its ``targets`` quantized to QuantizedTensor (others shared).

    ``clips`` maps a linear name to its (gamma, beta) clipping logits ``[out, n_groups]``;
    missing names use plain RTN.
    """
    clips = clips or {}
    out = dict(layer_params)
    for name in targets:
        w = layer_params[name]
        out[name] = w if is_quantized(w) else quantize(w, quant_config, clip=clips.get(name))
    return out


def freeze_params(
    params: Mapping[str, Any],
    quant_config: QuantConfig,
    clips: Mapping[str, Any] | None = None,
    targets: Sequence[str] = QUANT_TARGETS,
) -> dict[str, Any]:
    """Whole model frozen: ``clips`` as ``{"layers.<i>.<name>": (gamma, beta)}`` (optional)."""
    return quantize_params(params, quant_config, targets=targets, clips=clips)


# --- streams and errors ----------------------------------------------------------------------
@partial(jax.jit, static_argnames=("config",))
def _embed_jit(params: Mapping[str, Any], ids: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    return embed(params, ids, config)


def embed_ids(params: Mapping[str, Any], ids: Any, config: ModelConfig) -> jnp.ndarray:
    """Embeddings ``[n, seqlen, D]`` of the calibration ids (the start of every stream)."""
    return _embed_jit({"embed_tokens": params["embed_tokens"]}, jnp.asarray(ids, jnp.int32), config)


@partial(jax.jit, static_argnames=("config", "layer_idx"))
def run_block(
    layer_params: Mapping[str, Any],
    xs: jnp.ndarray,
    config: ModelConfig,
    lora: Lora | None = None,
    layer_idx: int | None = None,
) -> jnp.ndarray:
    """Apply one decoder block to every sample of ``xs [n, seqlen, D]`` (batch 1 each, one program).

    Linear leaves may be dense arrays or QuantizedTensors; ``lora`` is that layer's
    :class:`~apiq_jax.lora.Lora` (or None).
    """

    def one(x: jnp.ndarray) -> jnp.ndarray:
        return block_forward(
            layer_params, x[None], config, lora=lora, layer_idx=layer_idx
        )[0]

    return jax.lax.map(one, xs)


def block_errors(
    fp_params: Mapping[str, Any],
    q_params: Mapping[str, Any],
    lora: Lora | None,
    ids: Any,
    config: ModelConfig,
) -> list[float]:
    """Per-block relative activation error of a quantized model on ``ids``.

    The full-precision stream runs ``fp_params`` (no LoRA); the quantized stream runs
    ``q_params`` with ``lora`` active; block i's error is
    ``||x_fp_i - x_q_i||^2 / ||x_fp_i||^2`` over all samples
    (:func:`apiq_jax.evaluate.activation_errors`).
    """
    return activation_errors(fp_params, q_params, ids, config=config, lora=lora)


# --- resources -------------------------------------------------------------------------------
def memory_stats() -> dict[str, Any]:
    """``{"peak_rss_mb": float, "device_peak_bytes": int | None}`` for the current process."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere
    device_peak = None
    try:
        stats = jax.local_devices()[0].memory_stats()
        if stats:
            device_peak = int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
    except Exception:  # noqa: BLE001 - backends without memory stats
        device_peak = None
    return {"peak_rss_mb": float(rss_mb), "device_peak_bytes": device_peak}


class Stopwatch:
    """Wall-clock timer: ``Stopwatch().elapsed()`` in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since construction."""
        return time.perf_counter() - self.start


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


MethodFn = Callable[..., CalibrationResult]
