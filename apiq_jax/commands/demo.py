"""``apiq-jax demo``: 2-bit quantization of a small bundled model with every method, offline.

    apiq-jax demo [--out runs/demo] [--fast] [--methods rtn,qlora,...] [--epochs E] [--finetune-steps N]

See :data:`DESCRIPTION` (the ``--help`` text). The last stdout line is one JSON object
(:func:`summary_line`), as for every command.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from apiq_jax.calibration import METHODS, get_method
from apiq_jax.commands.common import print_json

#: LoftQ alternations the demo runs (the registry's comparison setting, as its "LoftQ" row says)
DEMO_LOFTQ_ITERATIONS = get_method("loftq").compare_options["num_iter"]
NAME = "demo"
HELP = "offline demo: 2-bit quantization of the bundled model with every method"
DESCRIPTION = f"""\
Offline demo: 2-bit quantization of a small bundled model with every method.

The bundled model (apiq_jax/assets/demo_model, a 1M-parameter Llama trained on the
Python standard library's source, see its README) is quantized to 2 bits with RTN,
QLoRA (NF2), LoftQ (NF2, {DEMO_LOFTQ_ITERATIONS} alternations), ApiQ-lw and ApiQ-bw. Calibration and
evaluation text are standard-library modules held out of the model's training, read
from the running Python install, so nothing is downloaded. For every method the demo
prints perplexity on the evaluation text and the mean per-block activation error
||x_fp - x_q||^2 / ||x_fp||^2 next to the full-precision model; then it finetunes each
method's LoRA factors for a few steps on the calibration text (the frozen 2-bit
weights untouched) and reports the perplexity again, and writes results.json and
demo.png into --out. The last stdout line is one JSON object with the summary.

  apiq-jax demo [--out runs/demo] [--fast] [--methods rtn,qlora,...] [--epochs E] [--finetune-steps N]
"""

#: the methods the demo compares by default, in table order (``--methods`` accepts every registered one)
DEMO_METHODS = ("rtn", "qlora", "loftq", "apiq-lw", "apiq-bw")
ALL_METHODS = DEMO_METHODS + tuple(m for m in METHODS if m not in DEMO_METHODS)

# full settings and the reduced --fast ones
FULL = {"nsamples": 32, "seqlen": 256, "epochs": 10, "eval_windows": 0, "finetune_steps": 50}
FAST = {"nsamples": 4, "seqlen": 128, "epochs": 1, "eval_windows": 8, "finetune_steps": 2}
#: LoRA finetuning after calibration: batch and peak learning rate (10 warm-up steps, cosine)
FINETUNE_BATCH = 8
FINETUNE_LR = 3e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax demo``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    p.add_argument("--out", default="runs/demo", help="output directory for results.json and demo.png (default runs/demo)")
    p.add_argument("--fast", action="store_true",
                   help=f"reduced run for tests/smoke checks: {FAST['nsamples']} calibration windows of "
                        f"{FAST['seqlen']} tokens, {FAST['epochs']} ApiQ epoch, {FAST['eval_windows']} eval windows")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated subset of {', '.join(ALL_METHODS)} (default: {','.join(DEMO_METHODS)})")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled demo model)")
    p.add_argument("--bits", type=int, default=2, help="weight bits (default 2)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {FULL['nsamples']})")
    p.add_argument("--seqlen", type=int, default=None, help=f"tokens per window (default {FULL['seqlen']})")
    p.add_argument("--epochs", type=int, default=None, help=f"ApiQ epochs per block/layer (default {FULL['epochs']})")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate on the first N windows only (default: all of the held-out text)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help=f"LoRA finetuning steps after calibration, on the calibration text (default "
                        f"{FULL['finetune_steps']}; 0 skips finetuning)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration windows and LoRA init (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> dict[str, int]:
    base = FAST if args.fast else FULL
    out = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    for k in ("nsamples", "seqlen"):
        if out[k] <= 0:
            raise ValueError(f"--{k} {out[k]} must be a positive integer")
    if out["epochs"] < 0 or out["eval_windows"] < 0 or out["finetune_steps"] < 0:
        raise ValueError("--epochs, --eval-windows and --finetune-steps must be >= 0")
    return out


def _methods(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise ValueError(f"--methods {spec!r}: unknown {bad or '(empty)'}; accepted: {', '.join(ALL_METHODS)}")
    return names


def summary_line(summary: dict[str, Any], results: Path, plot: Path | None) -> dict[str, Any]:
    """The JSON object the demo prints last: settings and one short entry per method.

    Args:
        summary: the content of ``results.json``.
        results: where ``results.json`` went.
        plot: where ``demo.png`` went (None if not written).

    Returns:
        ``summary`` without the per-block and per-step lists, plus ``results`` and ``plot``.
    """
    keep = ("method", "label", "bits_per_param", "perplexity", "mean_activation_error", "seconds",
            "perplexity_finetuned")
    rows = [{k: r[k] for k in keep if k in r} for r in summary["rows"]]
    return {**{k: v for k, v in summary.items() if k != "rows"}, "rows": rows, "results": str(results),
            "plot": None if plot is None else str(plot)}


def _data(model_dir: Path, settings: dict[str, int], seed: int) -> tuple[Any, Any, Any]:
    """Calibration windows, evaluation windows and the calibration stream of the bundled text."""
    from apiq_jax.data import sample_windows, split_windows, tokenize
    from apiq_jax.demo_data import demo_text
    from apiq_jax.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    seqlen = settings["seqlen"]
    calib_stream = tokenize(demo_text("calib"), tok)
    calib = sample_windows(calib_stream, settings["nsamples"], seqlen, seed=seed, name="demo calibration text")
    eval_ids = split_windows(tokenize(demo_text("eval"), tok), seqlen, name="demo evaluation text")
    if settings["eval_windows"]:
        eval_ids = eval_ids[: settings["eval_windows"]]
    return calib, eval_ids, calib_stream


def run(args: argparse.Namespace) -> int:
    """Run the demo: prints the table, where the files went, then the summary JSON line.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        ValueError: bad settings, or a perplexity that is not finite.
    """
    from apiq_jax.compare import compare_methods, format_table, save_plot
    from apiq_jax.data import split_windows
    from apiq_jax.demo_data import DEMO_MODEL_DIR
    from apiq_jax.lora import LoraConfig
    from apiq_jax.models import load_pretrained
    from apiq_jax.training import FinetuneConfig

    t0 = time.perf_counter()
    settings = _settings(args)
    methods = _methods(args.methods)
    model_dir = Path(args.model) if args.model else DEMO_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"demo model not found: {model_dir} (expected an HF directory with config.json)")
    model = load_pretrained(model_dir)
    config = model.config
    calib, eval_ids, calib_stream = _data(model_dir, settings, args.seed)
    steps = settings["finetune_steps"]
    rows = compare_methods(
        model.params, config, calib, eval_ids, methods, bits=args.bits, group_size=args.group_size,
        lora_config=LoraConfig(rank=args.rank, alpha=args.alpha), epochs=settings["epochs"], seed=args.seed,
        progress=not args.quiet,
        finetune_ids=split_windows(calib_stream, settings["seqlen"]) if steps else None,
        finetune_config=FinetuneConfig(steps=steps, batch_size=FINETUNE_BATCH, learning_rate=FINETUNE_LR,
                                       warmup_steps=min(10, steps), seed=args.seed) if steps else None,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.bits}-bit, group {args.group_size}, LoRA r={args.rank}"
    png = save_plot(rows, out / "demo.png", title)
    elapsed = time.perf_counter() - t0
    summary = {
        "model": str(model_dir), "bits": args.bits, "group_size": args.group_size, "rank": args.rank,
        "alpha": args.alpha, "seed": args.seed, "fast": bool(args.fast), **settings,
        "calib_shape": list(calib.shape), "eval_shape": list(eval_ids.shape), "rows": rows,
        "seconds": round(elapsed, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"apiq-jax demo: {config.num_hidden_layers}-layer Llama ({model_dir.name}), {title}; "
          f"calibration {calib.shape[0]}x{calib.shape[1]} tokens, evaluation {eval_ids.shape[0]}x{eval_ids.shape[1]} "
          "tokens of held-out Python stdlib source")
    print(format_table(rows))
    print(f"wrote {out / 'results.json'}" + (f" and {png}" if png else "") + f" in {elapsed:.0f}s")
    if not all(math.isfinite(r["perplexity"]) for r in rows):
        raise ValueError("a perplexity is not finite; see results.json")
    print_json(summary_line(summary, out / "results.json", png))
    return 0
