"""The block loop every calibration method runs: :func:`run_blocks`.

A method is a *block step* — ``step(i, layer, streams, bar) -> BlockOutput`` — that turns
decoder layer ``i`` (dense params) into its frozen form, given the activation streams the
previous block produced, and returns the streams for the next one. :func:`run_blocks`
feeds it the layers of a *block source* in order (any sequence of layer dicts:
``params["layers"]``, or an object that loads one layer per ``source[i]``, so a model need
not be in memory all at once), and owns what is common: skipping the blocks a resumed run
already finished, the progress bars, timing, checkpointing each finished block, and the
``on_block_end`` callback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apiq_jax.interrupts as interrupts
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, Stopwatch
from apiq_jax.lora import Lora
from apiq_jax.models.hf_io import materialize

__all__ = ["BlockOutput", "BlockSource", "BlockStep", "frozen_model", "run_blocks"]

#: a source of decoder layers: ``len(source)`` blocks, ``source[i]`` the dense params of layer i
BlockSource = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class BlockOutput:
    """What a block step produced for one layer.

    Attributes:
      frozen: the layer with its linears as QuantizedTensors (its final form).
      report: the block's :class:`~apiq_jax.calibration.reports.BlockReport`.
      lora: the layer's :class:`~apiq_jax.lora.Lora` (None where the method sets the LoRA
        of the whole model itself).
      streams: the activations the next block starts from (None when not needed).
      state: what a work directory saves to rebuild ``frozen`` and ``lora`` on resume
        (ApiQ: ``{"clip": {name: ClipLogits}, "lora": Lora}``), or None.
    """

    frozen: dict[str, Any]
    report: BlockReport
    lora: Lora | None = None
    streams: Any = None
    state: Any = None


#: ``step(i, layer, streams, bar) -> BlockOutput``
BlockStep = Callable[[int, Mapping[str, Any], Any, Progress], BlockOutput]


def run_blocks(
    step: BlockStep,
    source: BlockSource,
    streams: Any = None,
    *,
    desc: str,
    done: Sequence[BlockOutput] = (),
    save: Callable[[int, BlockOutput], None] | None = None,
    progress: bool = False,
    on_block_end: Callable[[int, BlockReport], None] | None = None,
    keep: Callable[[BlockOutput], BlockOutput] | None = None,
    materialize_layers: bool = True,
) -> list[BlockOutput]:
    """Run ``step`` on every block of ``source`` not in ``done``, in order.

    Args:
      step: the method's block step.
      source: the decoder layers (lazily read tensors are read when their block's turn comes).
      streams: the streams block ``len(done)`` starts from.
      desc: label of the progress bar (the method name).
      done: outputs of the first blocks, finished before (a resumed run).
      save: called as ``save(i, output)`` once block i is finished (checkpointing).
      progress: show tqdm bars (blocks; the step may add one over its epochs).
      on_block_end: called as ``on_block_end(i, report)`` after block i is saved.
      keep: what of a finished block stays in memory, ``keep(output) -> output`` (e.g. without
        the LoRA and state a work directory holds; default: everything but the streams).
      materialize_layers: read a lazily read block before its step (False: the step gets
        the lazy tensors and reads each once, e.g. straight into float32, so the block is
        never held in its storage dtype too).

    Returns:
      One :class:`BlockOutput` per block (streams dropped: only the last one is carried).
    """
    outputs = list(done)
    with Progress(progress, len(source), desc, done=len(outputs)) as bar:
        for i in range(len(outputs), len(source)):
            interrupts.check()  # a Ctrl-C whose exception was swallowed stops here, block i-1 saved
            timer = Stopwatch()
            layer = materialize(source[i]) if materialize_layers else source[i]  # a lazily read block: read now
            out = step(i, layer, streams, bar)
            del layer
            out = dataclasses.replace(out, report=dataclasses.replace(out.report, seconds=timer.elapsed()))
            if save is not None:
                save(i, out)
            bar.block_done(**_postfix(out.report))
            if on_block_end is not None:
                on_block_end(i, out.report)
            streams = out.streams
            out = dataclasses.replace(out, streams=None)
            outputs.append(out if keep is None else keep(out))
    return outputs


def _postfix(report: BlockReport) -> dict[str, str]:
    if report.error_before is not None and report.error_after is not None:
        return {"error": f"{report.error_before:.2e}->{report.error_after:.2e}"}
    return {}


def frozen_model(params: Mapping[str, Any], outputs: Sequence[BlockOutput]) -> dict[str, Any]:
    """The frozen model: ``params`` with every layer replaced by its block output.

    Args:
      params: the dense params (embeddings, norms and head are shared; lazily read ones are read).
      outputs: one :class:`BlockOutput` per layer.

    Returns:
      A new params dict.
    """
    frozen = {k: materialize(v) for k, v in params.items() if k != "layers"}  # lazily read tensors: now
    frozen["layers"] = [o.frozen for o in outputs]
    return {k: frozen[k] for k in params}
