"""``apiq-jax export``: a saved quantized model as a peft, merged or GPTQ Hugging Face checkpoint.

    apiq-jax export --model QDIR --format {peft,merged,gptq} --out DIR [--dtype D]
        [--checkpoint-format {gptq,gptq_v2}] [--overwrite]

See :mod:`apiq_jax.interop.export` and docs/interop.md. The last stdout line is one JSON
object (format, output directory, adapter directory). ``--out`` is claimed as ``quantize``
claims it (:class:`~apiq_jax.commands.outputs.OutputDir`): checked, locked, marked complete
by the last write.
"""

from __future__ import annotations

import argparse

from apiq_jax.commands.common import print_json
from apiq_jax.models.hf_io import DTYPES

NAME = "export"
HELP = "export a quantized model as a peft (official ApiQ), merged or GPTQ Hugging Face checkpoint"
DESCRIPTION = """\
Export a quantized model directory (from `apiq-jax quantize`, `finetune` or `import`) for other runtimes.

  apiq-jax export --model QDIR --format {peft,merged,gptq} --out DIR [--dtype D]
      [--checkpoint-format {gptq,gptq_v2}] [--overwrite]

peft:   the dequantized base as a plain Hugging Face checkpoint in DIR and the LoRA as a
        peft adapter in DIR/apiq_init (the official ApiQ layout).
merged: one dense Hugging Face checkpoint of W_hat + (alpha/r) B A.
gptq:   a Hugging Face GPTQ checkpoint (qweight/qzeros/scales/g_idx, desc_act false;
        checkpoint format gptq = v1, zero points stored minus one, or gptq_v2) in DIR and
        the LoRA as a peft adapter in DIR/apiq_init. Zero points are always stored
        (sym: false), so runtimes decode ApiQ's symmetric zero 2^(b-1)-1 correctly.

DIR is refused when it is, lies in or holds QDIR, already holds a finished export, holds
another command's output, or is a non-empty directory of something else (--overwrite
allows the last three); it is locked while the command runs and marked finished only by
the run's last write (DIR/.apiq-jax-run.json). An unfinished QDIR (an interrupted quantize,
finetune or import) is refused.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax export``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    from apiq_jax.interop.export import FORMATS
    from apiq_jax.interop.gptq_format import CHECKPOINT_FORMATS

    p.add_argument("--model", required=True, help="saved quantized model directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the dense tensors written (default: the model's own)")
    p.add_argument("--checkpoint-format", default="gptq", choices=CHECKPOINT_FORMATS,
                   help="GPTQ zero-point convention: gptq (v1, stored minus one; default) or gptq_v2")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished export (or another command's output) in --out, or write into a "
                        "non-empty directory (refused without it)")


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax export``.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        FileNotFoundError: ``--model`` is missing or not a saved quantized model.
        ValueError: ``--model`` is an unfinished output; an ``--out`` that overlaps ``--model``
            or may not be written (see :class:`~apiq_jax.commands.outputs.OutputDir`); a
            linear the GPTQ layout cannot hold (named).
    """
    from pathlib import Path

    from apiq_jax.commands.outputs import OutputDir, check_finished, check_paths
    from apiq_jax.interop.export import export_model
    from apiq_jax.models import is_quantized_dir

    model_dir, out = Path(args.model), Path(args.out)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    check_finished(model_dir)
    if not is_quantized_dir(model_dir):
        raise FileNotFoundError(f"--model {model_dir} is not a saved apiq-jax quantized model (no apiq_meta.json); "
                                "run `apiq-jax quantize` or `apiq-jax import` first")
    check_paths(out, model_dir)
    claim = OutputDir(out, NAME, args, overwrite=args.overwrite)
    claim.check()  # before reading the model
    with claim:
        # no start_work(): export_model raises its user errors before its first write, so one
        # leaves --out as it was found (a new one removed, the marker restored)
        summary = export_model(model_dir, out, args.format, dtype=args.dtype,
                               checkpoint_format=args.checkpoint_format,
                               overwrite=True)  # --out is claimed: it holds our marker and lock
        claim.finish()
    print_json(summary)
    return 0
