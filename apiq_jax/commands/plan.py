"""``apiq-jax plan``: expected peak memory of ``quantize`` and ``finetune`` from the shapes alone.

    apiq-jax plan --model DIR_or_config.json --method M --bits B [--nsamples N --seqlen S]
        [--batch-size B --grad-accum G --rank R --group-size N --dtype D --remat R --offload-activations]

See :mod:`apiq_jax.memory_plan` for what is counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apiq_jax.commands.common import check_method_options, field_default, print_json
from apiq_jax.models.hf_io import DTYPES

NAME = "plan"
HELP = "expected peak memory of quantize and finetune, from the model's shapes"
DESCRIPTION = """\
Print the expected peak memory of `apiq-jax quantize` and `apiq-jax finetune` for a
model, from its config alone (no weights are read or allocated).

  apiq-jax plan --model DIR_or_config.json --method apiq-bw --bits 2 --nsamples 128
      --seqlen 2048 [--batch-size 8 --grad-accum 1 --rank 64 --dtype bfloat16 --remat block]

Array sizes come from jax.eval_shape of the library's own functions and the programs'
temporary memory from XLA (jit(...).lower(shapes).compile().memory_analysis()) on this
machine's backend; quantize adds this process's resident memory as the runtime. The
table lists the parts of each peak; the last stdout line is one JSON object.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax plan``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    from apiq_jax.training import FinetuneConfig

    p.add_argument("--model", required=True, help="HF model directory, or its config.json")
    p.add_argument("--method", required=True, help="calibration method of quantize")
    p.add_argument("--bits", required=True, type=int, help="weight bits")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window, calibration and finetuning (default 2048)")
    p.add_argument("--batch-size", type=int, default=field_default(FinetuneConfig, "batch_size"),
                   help="finetuning rows per step")
    p.add_argument("--grad-accum", type=int, default=1, help="finetuning micro-batches per step (default 1)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="storage and compute dtype (default: the config's torch_dtype)")
    p.add_argument("--offload-activations", action="store_true",
                   help="apiq-bw: the activation caches in host memory (as quantize --offload-activations)")
    p.add_argument("--remat", default="block", help="finetuning rematerialisation policy (default block)")
    p.add_argument("--skip", choices=("quantize", "finetune"), default=None, help="plan only the other job")


def _load_config(path: Path) -> tuple[Any, str]:
    from apiq_jax.models.config import ModelConfig
    from apiq_jax.models.hf_io import checkpoint_dtype

    if not path.exists():
        raise FileNotFoundError(f"--model {path}: not found (give an HF model directory or its config.json)")
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path}: cannot read the config: {e}") from None
    return ModelConfig.from_hf(hf), checkpoint_dtype(hf).name


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax plan``; prints a table per job and the JSON summary last.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        ValueError: an unknown method, bits the method does not take, or a non-positive size.
        FileNotFoundError: a missing ``--model``.
    """
    from apiq_jax.lora import LoraConfig
    from apiq_jax.memory_plan import GiB, QuantizePlanInputs, plan_finetune, plan_quantize
    from apiq_jax.quant import QuantConfig
    from apiq_jax.training import FinetuneConfig

    spec = check_method_options(args.method, args.bits, {
        name: getattr(args, name) for name in ("group_size", "rank", "nsamples", "seqlen", "batch_size", "grad_accum")})
    if args.offload_activations and args.method != "apiq-bw":
        raise ValueError(f"--offload-activations applies to --method apiq-bw only, not {args.method}")
    config, declared = _load_config(Path(args.model))
    dtype = args.dtype or declared
    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size, scheme=spec.default_scheme)
    lcfg = LoraConfig(rank=args.rank, alpha=16.0)
    plans = []
    if args.skip != "quantize":
        plans.append(plan_quantize(config, QuantizePlanInputs(
            method=args.method, quant_config=qcfg, lora_config=lcfg, nsamples=args.nsamples, seqlen=args.seqlen,
            dtype=dtype, offload_activations=args.offload_activations)))
    if args.skip != "finetune":
        fc = FinetuneConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, dtype=dtype, remat=args.remat)
        plans.append(plan_finetune(config, qcfg, lcfg, args.batch_size, args.seqlen, fc))
    for plan in plans:
        print(f"\n{plan.job}: expected peak {plan.peak_bytes / GiB:.2f} GiB ({plan.phase})")
        if plan.host_only_bytes:
            print(f"  on an accelerator: {(plan.peak_bytes - plan.host_only_bytes) / GiB:.2f} GiB of device memory, "
                  "the parts marked (host) in host memory")
        for part, nbytes in plan.parts.items():
            print(f"  {part:45s} {nbytes / GiB:9.3f} GiB")
    print_json({"model": str(args.model), "dtype": dtype, "method": args.method, "bits": args.bits,
                **{p.job: p.to_dict() for p in plans}})
    return 0
