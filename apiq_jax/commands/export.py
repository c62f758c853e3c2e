"""``apiq-jax export``: a saved quantized model as a peft, merged or GPTQ Hugging Face checkpoint.

    apiq-jax export --model QDIR --format {peft,merged,gptq} --out DIR [--dtype D]
        [--checkpoint-format {gptq,gptq_v2}]

See :mod:`apiq_jax.interop.export` and docs/interop.md. The last stdout line is one JSON
object (format, output directory, adapter directory).
"""

from __future__ import annotations

import argparse

from apiq_jax.commands.common import print_json
from apiq_jax.models.hf_io import DTYPES

NAME = "export"
HELP = "export a quantized model as a peft (official ApiQ), merged or GPTQ Hugging Face checkpoint"
DESCRIPTION = """\
Export a quantized model directory (from `apiq-jax quantize` or `finetune`) for other runtimes.

  apiq-jax export --model QDIR --format {peft,merged,gptq} --out DIR [--dtype D]
      [--checkpoint-format {gptq,gptq_v2}]

peft:   the dequantized base as a plain Hugging Face checkpoint in DIR and the LoRA as a
        peft adapter in DIR/apiq_init (the official ApiQ layout).
merged: one dense Hugging Face checkpoint of W_hat + (alpha/r) B A.
gptq:   a Hugging Face GPTQ checkpoint (qweight/qzeros/scales/g_idx, desc_act false;
        checkpoint format gptq = v1, zero points stored minus one, or gptq_v2) in DIR and
        the LoRA as a peft adapter in DIR/apiq_init. Zero points are always stored
        (sym: false), so runtimes decode ApiQ's symmetric zero 2^(b-1)-1 correctly.
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
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the dense tensors written (default: the model's own)")
    p.add_argument("--checkpoint-format", default="gptq", choices=CHECKPOINT_FORMATS,
                   help="GPTQ zero-point convention: gptq (v1, stored minus one; default) or gptq_v2")


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax export``.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        FileNotFoundError: ``--model`` is not a saved quantized model.
        ValueError: a non-empty ``--out``, or a linear the GPTQ layout cannot hold (named).
    """
    from apiq_jax.interop.export import export_model

    print_json(export_model(args.model, args.out, args.format, dtype=args.dtype,
                            checkpoint_format=args.checkpoint_format))
    return 0
