"""``apiq-jax import``: an official-ApiQ-style or GPTQ checkpoint as a quantized apiq-jax model.

    apiq-jax import --from apiq SRC --out QDIR --bits B [--group-size G] [--scheme S] [--adapter DIR]
    apiq-jax import --from gptq SRC --out QDIR [--adapter DIR] [--rank R] [--alpha A]

(The module is ``import_`` because ``import`` is a Python keyword; the command is ``import``.)
``--out`` is claimed as ``quantize`` claims it (:class:`~apiq_jax.commands.outputs.OutputDir`):
checked, locked, marked complete by the last write, so ``eval``/``finetune``/``export``
refuse an interrupted import.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apiq_jax.commands.common import print_json

NAME = "import"
HELP = "import an official-ApiQ-style (fake-quantized base + peft adapter) or GPTQ checkpoint"
DESCRIPTION = """\
Turn another tool's checkpoint into an apiq-jax quantized model directory (for eval,
finetune, generate, export).

  apiq-jax import --from apiq SRC --out QDIR --bits B [--group-size G] [--scheme S] [--adapter DIR]
  apiq-jax import --from gptq SRC --out QDIR [--adapter DIR] [--rank R] [--alpha A]

apiq: SRC is a Hugging Face checkpoint whose targeted linears are fake-quantized (at
      most 2^bits distinct values per group of G inputs), with a peft adapter in
      SRC/apiq_init or SRC (or --adapter). Codes, float16 scales and zero points are
      recovered exactly; a group with more values is an error naming it.
gptq: SRC is a Hugging Face GPTQ checkpoint (desc_act false; checkpoint_format gptq or
      gptq_v2; one model.safetensors or shards listed by model.safetensors.index.json;
      float16, bfloat16 or float32 scales). Its peft adapter (SRC/apiq_init or --adapter)
      is attached, else a fresh QLoRA-initialised LoRA of --rank/--alpha so the model is
      ready for finetune.

QDIR is refused when it is, lies in or holds SRC or --adapter, already holds a finished
model, holds another command's output, or is a non-empty directory of something else
(--overwrite allows the last three); it is locked while the command runs and marked
finished only by the run's last write (QDIR/.apiq-jax-run.json). An unfinished SRC (an
interrupted apiq-jax export) is refused.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax import``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    from apiq_jax.interop.importer import SOURCES

    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="what SRC is")
    p.add_argument("src", metavar="SRC", help="the directory to import")
    p.add_argument("--out", required=True, help="output quantized model directory (new or empty; see --overwrite)")
    p.add_argument("--adapter", default=None, help="peft adapter directory (default: SRC/apiq_init or SRC)")
    p.add_argument("--bits", type=int, default=None, help="apiq: bits the base was fake-quantized with")
    p.add_argument("--group-size", type=int, default=64, help="apiq: quantization group size (default 64)")
    p.add_argument("--scheme", default="asym", choices=("asym", "sym"), help="apiq: quantizer scheme (default asym)")
    p.add_argument("--rank", type=int, default=64, help="gptq without adapter: LoRA rank (default 64)")
    p.add_argument("--alpha", type=float, default=16.0, help="gptq without adapter: LoRA alpha (default 16)")
    p.add_argument("--seed", type=int, default=0, help="gptq without adapter: seed of the LoRA init")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished model (or another command's output) in --out, or write into a "
                        "non-empty directory (refused without it)")


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax import``.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        FileNotFoundError: a missing source, adapter or file.
        ValueError: ``--from apiq`` without ``--bits``; an unfinished SRC; an ``--out`` that
            overlaps SRC or ``--adapter`` or may not be written (see
            :class:`~apiq_jax.commands.outputs.OutputDir`); and the errors of
            :func:`~apiq_jax.interop.importer.import_apiq` /
            :func:`~apiq_jax.interop.importer.import_gptq` (each naming the layer or file).
    """
    from apiq_jax.commands.outputs import OutputDir, check_finished, check_overlap, check_paths
    from apiq_jax.interop.importer import import_apiq, import_gptq
    from apiq_jax.lora import LINEARS, LoraConfig
    from apiq_jax.quant import QuantConfig

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src}: directory not found")
    check_finished(src, "SRC")
    check_paths(out, src, "SRC")  # also: --out a file, not writable
    if args.adapter is not None:
        check_overlap(out, Path(args.adapter), "--adapter")
    cfg = lora_config = None
    if args.source == "apiq":
        if args.bits is None:
            raise ValueError("--from apiq needs --bits (the bit width the base was fake-quantized with)")
        cfg = QuantConfig(bits=args.bits, group_size=args.group_size, scheme=args.scheme)
    else:
        lora_config = LoraConfig(rank=args.rank, alpha=args.alpha, targets=LINEARS)
    # the marker records the input directories resolved (as quantize's --model), not as typed, and
    # --from under its flag's name (a re-run over an interrupted import names the flags that differ)
    recorded = {k: v for k, v in vars(args).items() if k != "source"}
    recorded = argparse.Namespace(**{**recorded, "from": args.source, "src": str(src.resolve()),
                                     "adapter": None if args.adapter is None else str(Path(args.adapter).resolve())})
    claim = OutputDir(out, NAME, recorded, overwrite=args.overwrite)
    claim.check()  # before reading SRC
    with claim:
        # no start_work(): the importers raise their user errors before save_quantized writes
        # anything, so one leaves --out as it was found (a new one removed, the marker restored)
        if cfg is not None:
            summary = import_apiq(src, out, cfg, adapter=args.adapter)
        else:
            summary = import_gptq(src, out, adapter=args.adapter, lora_config=lora_config, seed=args.seed)
        claim.finish()
    print_json(summary)
    return 0
