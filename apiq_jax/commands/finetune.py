"""``apiq-jax finetune``: train the LoRA factors of a saved quantized model on text or ids.

    apiq-jax finetune --model QUANT_DIR --data FILE --out OUT [--steps N] [--batch-size B]
        [--lr LR] [--seqlen L] [--eval FILE] [--save-every K] [--seed S]

``QUANT_DIR`` is a directory written by ``apiq-jax quantize`` (frozen bit-packed weights +
LoRA). Only the LoRA pytree is trained (AdamW, warm-up + cosine decay, gradient clipping);
the quantized weights are never differentiated. ``--data``/``--eval`` take token ids
(``.npy``) or raw text (``.txt``) like ``apiq-jax eval``. Training state is checkpointed
with orbax under ``OUT/checkpoints`` every ``--save-every`` steps: re-running an
interrupted command continues from the last checkpoint. ``OUT`` ends up a quantized model
directory with the finetuned LoRA (``apiq-jax eval --model OUT`` reads it), plus
``loss.png``. The last stdout line is one JSON object with the run's summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

CHECKPOINT_SUBDIR = "checkpoints"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``apiq-jax finetune``."""
    p.add_argument("--model", required=True, help="quantized model directory (from apiq-jax quantize)")
    p.add_argument("--data", required=True, help="training data: token ids (.npy) or raw text (.txt)")
    p.add_argument("--out", required=True, help="output directory (created; holds checkpoints while training)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length for 1-D ids and text (default: min(2048, max_position_embeddings))")
    p.add_argument("--eval", default=None, help="optional held-out data: perplexity before and after")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from apiq_jax.cli import add_backend_argument

    add_backend_argument(p)


def _save_loss_plot(losses: list[float], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA finetuning on the frozen quantized model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax finetune``; prints the summary JSON as the last stdout line."""
    from apiq_jax.cli import compute_backend, load_token_data
    from apiq_jax.evaluate import perplexity_ids
    from apiq_jax.models import is_quantized_dir, load_quantized, save_quantized
    from apiq_jax.training import FinetuneConfig, finetune

    t0 = time.perf_counter()
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    if not is_quantized_dir(model_dir):
        raise ValueError(
            f"--model {model_dir} is not a saved quantized model (no apiq_meta.json); run "
            "`apiq-jax quantize` first"
        )
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen {args.seqlen} must be >= 2")
    frozen, lora, config, lora_config, meta = load_quantized(model_dir)
    if lora is None or lora_config is None:
        raise ValueError(f"--model {model_dir} holds no LoRA factors to finetune")
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup, seed=args.seed,
                         save_every=args.save_every)
    max_len = config.max_position_embeddings
    train_ids = load_token_data(Path(args.data), model_dir, args.seqlen, max_len)
    eval_ids = None if args.eval is None else load_token_data(Path(args.eval), model_dir, args.seqlen, max_len)

    def ppl(params: Any, lo: Any) -> float | None:
        if eval_ids is None:
            return None
        return perplexity_ids(params, eval_ids, config=config, lora=lo, lora_scale=lora_config.scale).perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with compute_backend(args.backend) as (backend, prepare):
        compute = prepare(frozen)  # kernel layout for Pallas; `frozen` stays the storage layout
        ppl_before = ppl(compute, lora)
        lora, losses = finetune(compute, lora, config, lora_config.scale, train_ids, cfg,
                                checkpoint_dir=out / CHECKPOINT_SUBDIR, progress=not args.quiet)
        ppl_after = ppl(compute, lora)
    summary: dict[str, Any] = {
        "steps": cfg.steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
        "train_windows": int(train_ids.shape[0]), "seqlen": int(train_ids.shape[1]),
        "first_loss": losses[0], "final_loss": losses[-1],
        "perplexity_before": ppl_before, "perplexity_after": ppl_after, "backend": backend,
    }
    save_quantized(out, frozen, lora, config, lora_config,
                   metadata={**meta, "finetune": {**summary, "losses": losses, "base": str(model_dir)}},
                   tokenizer_source=model_dir)
    _save_loss_plot(losses, out / "loss.png")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["out"] = str(out)
    print(json.dumps(summary))
    return 0
