"""``apiq-jax finetune``: train the LoRA factors of a saved quantized model on text or ids.

    apiq-jax finetune --model QUANT_DIR --data FILE --out OUT [--steps N] [--batch-size B]
        [--lr LR] [--seqlen L] [--eval FILE] [--save-every K] [--seed S]
        [--dtype D] [--remat R] [--grad-accum N]

Training defaults are those of apiq_jax.training.FinetuneConfig (read from the dataclass,
so the CLI and the library cannot disagree). See :data:`DESCRIPTION` for the rest.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from apiq_jax.commands.common import (
    DEFAULT_SEQLEN,
    add_backend_argument,
    add_mesh_arguments,
    command_mesh,
    compute_backend,
    field_default,
    load_token_data,
    print_json,
    unwise_option_warnings,
    warn,
)
from apiq_jax.data import check_tokenizer_vocab, data_suffix, training_windows

NAME = "finetune"
HELP = "train the LoRA factors of a saved quantized model (resumable)"
DESCRIPTION = """\
Train the LoRA factors of a saved quantized model on text or token ids.

  apiq-jax finetune --model QUANT_DIR --data FILE --out OUT [--steps N] [--batch-size B]
      [--lr LR] [--seqlen L] [--eval FILE] [--save-every K] [--seed S]
      [--dtype D] [--remat R] [--grad-accum N]

QUANT_DIR is a directory written by apiq-jax quantize (frozen bit-packed weights +
LoRA). Only the LoRA pytree is trained (AdamW, warm-up + cosine decay, gradient
clipping); the quantized weights are never differentiated. --data/--eval take token
ids (.npy) or raw text (.txt) like apiq-jax eval; --data is memory-mapped and read a
batch at a time (text is tokenized once into OUT/data_cache/, re-used on re-run).
Memory: --dtype bfloat16 halves the activations, --remat block (or sqrt) keeps one
activation per block (per ~sqrt(layers) blocks) instead of every intermediate, and
--grad-accum N splits each batch into N micro-batches; none of them changes what one
optimizer step computes (beyond 16-bit rounding). Training state is checkpointed with
orbax under OUT/checkpoints every --save-every steps: re-running an interrupted
command continues from the last checkpoint. OUT ends up a quantized model directory
with the finetuned LoRA (apiq-jax eval --model OUT reads it), plus loss.png. The
defaults are those of apiq_jax.training.FinetuneConfig. The last stdout line is one
JSON object with the run's summary. OUT is checked, locked and marked as for apiq-jax
quantize (see docs/reliability.md); a re-run with other arguments over an interrupted
run is refused, naming the flags that differ (--overwrite starts over).
"""
#: training state checkpoints inside --out
CHECKPOINT_SUBDIR = "checkpoints"
#: token ids of --data text, tokenized once, inside --out
DATA_CACHE_SUBDIR = "data_cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax finetune``; defaults come from FinetuneConfig.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    from apiq_jax.models.llama import REMAT_POLICIES
    from apiq_jax.training import DTYPES, FinetuneConfig

    d = {name: field_default(FinetuneConfig, name)
         for name in ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay", "save_every", "seed",
                      "dtype", "remat", "grad_accum")}
    p.add_argument("--model", required=True, help="quantized model directory (from apiq-jax quantize)")
    p.add_argument("--data", required=True, help="training data: token ids (.npy) or raw text (.txt)")
    p.add_argument("--out", required=True, help="output directory (created; holds checkpoints while training)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default {d['steps']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"windows per step (default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=d["learning_rate"],
                   help=f"peak learning rate (default {d['learning_rate']:g})")
    p.add_argument("--warmup", type=int, default=d["warmup_steps"],
                   help=f"linear warm-up steps (default {d['warmup_steps']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help=f"AdamW weight decay (default {d['weight_decay']:g})")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"window length for 1-D ids and text (default: min({DEFAULT_SEQLEN}, max_position_embeddings))")
    p.add_argument("--eval", default=None, help="optional held-out data: perplexity before and after")
    p.add_argument("--save-every", type=int, default=d["save_every"],
                   help=f"checkpoint interval in steps (default {d['save_every']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the batch order (default {d['seed']})")
    # validated by FinetuneConfig (a one-line error naming the value and what is accepted)
    p.add_argument("--dtype", default=d["dtype"], metavar="{" + ",".join(DTYPES) + "}",
                   help="compute dtype: the dtype of the activations and of the frozen weights in the forward "
                        "and backward passes (the packed codes are untouched; LoRA master weights, gradients "
                        f"and optimizer state stay float32). bfloat16/float16 halve activation memory; float16 "
                        f"scales the loss by the tokens of a micro-batch (default {d['dtype']})")
    p.add_argument("--remat", default=d["remat"], metavar="{" + ",".join(REMAT_POLICIES) + "}",
                   help="what each decoder block keeps for the backward pass: none = every intermediate, nothing recomputed "
                        "(memory linear in depth and batch); block = only its input, the block is "
                        "recomputed (~1/3 more compute); dots = also the outputs of the linears; sqrt = only "
                        "the input of every ~sqrt(layers)-th block (least memory, ~1/4 more compute than "
                        "block). With a remat policy the layers run as one lax.scan (compile time flat in depth). "
                        f"Default {d['remat']}: no recomputation, the same program as before; on small models no "
                        "setting is consistently faster on CPU (benchmarks/memory.py finetune: within the +-10%% "
                        "run-to-run noise), so the fastest step on small models is kept; use block or sqrt when "
                        "the activations do not fit")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], metavar="N",
                   help="split every batch of --batch-size windows into N micro-batches whose gradients are "
                        "averaged inside one step: the same update, 1/N of the activation memory (must divide "
                        f"--batch-size; default {d['grad_accum']})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished OUT or an interrupted run with other arguments (discarding its "
                        "checkpoints), or write into a non-empty directory (refused without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_argument(p)
    add_mesh_arguments(p)


def save_loss_plot(losses: list[float], path: Path) -> Path | None:
    """Plot the training loss per step into a PNG.

    Args:
        losses: loss of every step.
        path: output file (parent directories are created).

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    from apiq_jax.plotting import pyplot, save_figure

    try:
        plt = pyplot()
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA finetuning on the frozen quantized model")
    fig.tight_layout()
    return save_figure(fig, path)


def saved_step(checkpoint_dir: Path) -> int:
    """The newest step saved under ``checkpoint_dir`` (orbax step directories), read without orbax.

    Args:
        checkpoint_dir: ``OUT/checkpoints``.

    Returns:
        The step, 0 when none was saved.
    """
    if not checkpoint_dir.is_dir():
        return 0
    steps = [int(p.name) for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, default=0)


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax finetune``; prints the summary JSON as the last stdout line.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        FileNotFoundError: a missing ``--model`` directory or data file.
        ValueError: ``--model`` is not a saved quantized model or holds no LoRA, a
            ``--seqlen`` below 2, invalid training settings (see
            :class:`~apiq_jax.training.FinetuneConfig`: ``--dtype``, ``--remat``,
            ``--grad-accum``), and the data errors of
            :func:`~apiq_jax.data.training_windows` and
            :func:`~apiq_jax.commands.common.load_token_data`.
    """

    from apiq_jax.commands.outputs import OutputDir, SecondaryOutput, check_finished, check_paths
    from apiq_jax.evaluate import perplexity_ids
    from apiq_jax.models import is_quantized_dir, load_quantized, save_quantized
    from apiq_jax.sharding import is_primary, to_host
    from apiq_jax.training import FinetuneConfig, finetune

    t0 = time.perf_counter()
    mesh = command_mesh(args)  # first: jax.distributed starts before any computation
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    check_finished(model_dir)
    if not is_quantized_dir(model_dir):
        raise ValueError(
            f"--model {model_dir} is not a saved quantized model (no apiq_meta.json); run "
            "`apiq-jax quantize` first"
        )
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen {args.seqlen} must be >= 2")
    for flag_name, v in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not math.isfinite(v) or v < 0 or (flag_name == "--lr" and v == 0):
            raise ValueError(f"{flag_name} {v} is not accepted; accepted: a finite number "
                             f"{'> 0' if flag_name == '--lr' else '>= 0'}")
    out = Path(args.out)
    check_paths(out, model_dir)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup, seed=args.seed,
                         save_every=args.save_every, dtype=args.dtype, remat=args.remat, grad_accum=args.grad_accum)
    primary = is_primary()  # of a multi-process run, process 0 alone claims and writes --out
    claim = OutputDir(out, NAME, args, overwrite=args.overwrite, work_subdirs=(CHECKPOINT_SUBDIR, DATA_CACHE_SUBDIR),
                      rerun_finished=True) if primary else SecondaryOutput()
    claim.check()  # before reading the model
    frozen, lora, config, meta = load_quantized(model_dir)
    if lora is None:
        raise ValueError(f"--model {model_dir} holds no LoRA factors to finetune")
    max_len = config.max_position_embeddings
    if args.seqlen is not None and args.seqlen > max_len:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings {max_len}; "
                         f"accepted: 2 <= --seqlen <= {max_len}")
    if data_suffix(args.data, name=f"--data {args.data}") == ".txt":
        check_tokenizer_vocab(model_dir, config.vocab_size)
    eval_ids = None if args.eval is None else load_token_data(
        Path(args.eval), "--eval", model_dir=model_dir, seqlen=args.seqlen, max_len=max_len,
        vocab_size=config.vocab_size)
    for msg in unwise_option_warnings(config, rank=lora.config.rank, group_size=None, bits=None):
        warn(NAME, msg)
    ckpt_dir = out / CHECKPOINT_SUBDIR
    args.resume_hint = lambda: (f"step {saved_step(ckpt_dir)}/{cfg.steps}" if saved_step(ckpt_dir) else None)

    def ppl(params: Any, lo: Any) -> float | None:
        if eval_ids is None:
            return None
        return perplexity_ids(params, eval_ids, config=config, lora=lo, backend=backend, mesh=mesh).perplexity

    with claim:
        # memory-mapped, read a batch at a time; text is tokenized once into OUT/data_cache
        train_ids = training_windows(
            Path(args.data), seqlen=args.seqlen, default_seqlen=min(DEFAULT_SEQLEN, max_len),
            tokenizer_dir=model_dir, cache_dir=out / DATA_CACHE_SUBDIR, vocab_size=config.vocab_size,
            name=f"--data {args.data}")
        n = int(train_ids.shape[0])
        if cfg.batch_size > n:
            warn(NAME, f"--batch-size {cfg.batch_size} is more than the {n} training windows: every batch repeats "
                       "windows")
        elif n % cfg.batch_size:
            warn(NAME, f"--batch-size {cfg.batch_size} does not divide the {n} training windows: {n % cfg.batch_size} "
                       "of them (a different set each epoch) are left out of every epoch")
        done = saved_step(ckpt_dir)
        if done:
            print(f"apiq-jax {NAME}: resuming from step {done}/{cfg.steps} ({ckpt_dir})", file=sys.stderr, flush=True)
        claim.start_work()
        backend, prepare = compute_backend(args.backend)
        compute = prepare(frozen)  # kernel layout for Pallas; `frozen` stays the storage layout
        ppl_before = ppl(compute, lora)
        lora, losses = finetune(compute, lora, train_ids, config, cfg, checkpoint_dir=ckpt_dir,
                                progress=not args.quiet, backend=backend, mesh=mesh)
        lora = to_host(lora)
        ppl_after = ppl(compute, lora)
        summary: dict[str, Any] = {
            "steps": cfg.steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
            "train_windows": n, "seqlen": int(train_ids.shape[1]),
            "first_loss": losses[0], "final_loss": losses[-1],
            "perplexity_before": ppl_before, "perplexity_after": ppl_after, "backend": backend,
            "dtype": cfg.dtype, "remat": cfg.remat, "grad_accum": cfg.grad_accum,
        }
        if primary:
            save_quantized(out, frozen, lora, config,
                           metadata={**meta, "finetune": {**summary, "losses": losses, "base": str(model_dir)}},
                           tokenizer_source=model_dir)
            save_loss_plot(losses, out / "loss.png")
        claim.finish()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["out"] = str(out)
    print_json(summary)
    return 0
