"""What a calibration returns: :class:`CalibrationResult` with its :class:`CalibrationReport`.

Every method returns ``CalibrationResult(params=frozen, lora=lora, report=report)``:

* ``params`` is the *frozen* model: the same pytree with all seven linears of every layer
  replaced by a :class:`~apiq_jax.quant.QuantizedTensor`; embeddings, norms and head are
  unchanged (shared, not copied).
* ``lora`` is a :class:`~apiq_jax.lora.Lora` over ``lora_config.targets``; the model
  computes ``x @ W_hat.T + lora.scale * (x @ a) @ b``.
* ``report`` is a :class:`CalibrationReport` (JSON-able via ``to_dict``/``save_json``, PNG via
  ``save_plot``) with one :class:`BlockReport` per decoder block.
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
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.quant import QuantConfig

__all__ = ["BlockReport", "CalibrationReport", "CalibrationResult", "Stopwatch", "memory_stats"]


class _JsonForm:
    """``to_dict`` / ``from_dict`` of a report dataclass, field by field (``_LOAD``: converters back)."""

    _LOAD: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dict.

        Returns:
          ``{field: value}``: tuples as lists, nested reports as dicts.
        """
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict` (missing optional fields take their defaults).

        Args:
          d: a dict written by :meth:`to_dict`.

        Returns:
          The report.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name in d]
        return cls(**{n: cls._LOAD.get(n, _same)(d[n]) for n in names})


def _same(value: Any) -> Any:
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, _JsonForm):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass(frozen=True)
class BlockReport(_JsonForm):
    """What happened to one decoder block (JSON-able: ``to_dict`` / ``from_dict``).

    Attributes:
      index: block index.
      error_before: relative activation error ``||x_fp - x_q||^2 / ||x_fp||^2`` of the
        block's output at the method's starting point (ApiQ: plain RTN, clip logits at
        their init and the initial LoRA), on the calibration stream; None when not measured.
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

    _LOAD: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "index": int, "loss_curve": lambda v: tuple(float(x) for x in v), "seconds": float, "extra": dict,
    }


@dataclasses.dataclass(frozen=True)
class CalibrationReport(_JsonForm):
    """Summary of one calibration run (JSON-able: ``to_dict`` / ``from_dict``).

    Attributes:
      method: registry name ("apiq-bw", "rtn", ...).
      quant_config, lora_config: the configs as dicts.
      calib_shape: ``(n_samples, seqlen)`` of the calibration ids.
      blocks: one :class:`BlockReport` per decoder block, in order.
      seconds: total wall time.
      peak_rss_mb: peak resident host memory of the process (MiB) at the end of the run.
      device_peak_bytes: peak device memory when the backend reports it, else None.
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

    _LOAD: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "quant_config": dict, "lora_config": dict, "calib_shape": tuple, "seconds": float, "options": dict,
        "extra": dict, "blocks": lambda v: tuple(BlockReport.from_dict(b) for b in v),
    }

    @classmethod
    def build(
        cls, method: str, quant_config: QuantConfig, lora_config: LoraConfig, calib_shape: Sequence[int], *,
        blocks: Sequence[BlockReport] = (), seconds: float = 0.0, options: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> CalibrationReport:
        """A report with the configs serialised and the memory statistics taken now.

        Args:
          method: registry name.
          quant_config, lora_config: the configs used.
          calib_shape: shape of the calibration ids.
          blocks: the per-block reports.
          seconds: total wall time.
          options: method options (made JSON-able).
          extra: method-specific values (made JSON-able).

        Returns:
          The :class:`CalibrationReport`.
        """
        mem = memory_stats()
        return cls(
            method=method, quant_config=dataclasses.asdict(quant_config), lora_config=lora_config.to_dict(),
            calib_shape=(int(calib_shape[0]), int(calib_shape[1])), blocks=tuple(blocks), seconds=float(seconds),
            peak_rss_mb=mem["peak_rss_mb"], device_peak_bytes=mem["device_peak_bytes"],
            options=_jsonable(dict(options or {})), extra=_jsonable(dict(extra or {})),
        )

    @property
    def errors_before(self) -> list[float | None]:
        """Per-block activation error at the starting point."""
        return [b.error_before for b in self.blocks]

    @property
    def errors_after(self) -> list[float | None]:
        """Per-block activation error of the result."""
        return [b.error_after for b in self.blocks]

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as indented JSON.

        Args:
          path: the file (parents are created).

        Returns:
          The path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def save_plot(self, path: str | os.PathLike) -> Path | None:
        """PNG with the loss curve of every block and the per-block activation errors.

        Args:
          path: the PNG file (parents are created).

        Returns:
          The path, or None (nothing written) when matplotlib is not importable.
        """
        try:
            from apiq_jax.plotting import pyplot, save_figure

            plt = pyplot()
        except ImportError:  # pragma: no cover - matplotlib is optional
            return None
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
        for b in self.blocks:
            if b.loss_curve:
                ax0.plot(np.arange(len(b.loss_curve)), b.loss_curve, label=f"block {b.index}", lw=1)
        ax0.set(xlabel="step", ylabel="loss", yscale="log", title=f"{self.method}: training loss per block")
        if any(b.loss_curve for b in self.blocks) and len(self.blocks) <= 12:
            ax0.legend(fontsize=7)
        idx = [b.index for b in self.blocks]
        before = [np.nan if b.error_before is None else b.error_before for b in self.blocks]
        after = [np.nan if b.error_after is None else b.error_after for b in self.blocks]
        if not all(math.isnan(x) for x in before):
            ax1.plot(idx, before, "o-", label="before")
        ax1.plot(idx, after, "o-", label="after")
        ax1.set(xlabel="block", ylabel="||x_fp - x_q||^2 / ||x_fp||^2", yscale="log", title="activation error")
        ax1.legend()
        fig.tight_layout()
        return save_figure(fig, path)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Output of every calibration method.

    Attributes:
      params: the frozen model params: quantized linears are QuantizedTensor leaves.
      lora: the :class:`~apiq_jax.lora.Lora` (``lora_config.targets`` of every layer).
      report: the :class:`CalibrationReport`.
      extras: optional method-specific arrays; ApiQ: the learned clipping logits as
        ``{"clip": {"layers": [{name: ClipLogits}]}}``. Empty by default.
    """

    params: Mapping[str, Any]
    lora: Lora
    report: CalibrationReport
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def memory_stats() -> dict[str, Any]:
    """Peak host and device memory of the current process.

    Returns:
      ``{"peak_rss_mb": float, "device_peak_bytes": int | None}``.
    """
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
        """Seconds since construction.

        Returns:
          The elapsed wall time.
        """
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
