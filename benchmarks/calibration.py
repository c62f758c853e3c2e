"""Calibration benchmark: every method on stories260K at 2, 3 and 4 bits.

For each (bits, method) it prints perplexity on the held-out TinyStories windows, the mean
per-block activation error ``||x_fp - x_q||^2 / ||x_fp||^2`` (on the same windows), stored
bits per weight, calibration wall time (compilation included) and the peak resident memory
of the process that ran it. Every calibration runs in a fresh Python process so that its
peak memory is its own; the full-precision row is the baseline measured in the same run.

    python benchmarks/calibration.py [--shared DIR] [--bits 2,3,4] [--methods ...]
        [--nsamples 128] [--epochs 20] [--rank 8] [--alpha 16] [--out runs/bench_calibration]

``--shared`` (default ``$APIQ_SHARED`` or the ``shared`` folder beside the checkout) holds
``models/stories260K`` and ``data/tinystories260K/{calib,eval}.npy``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the benchmark's default methods, in table order (every name of apiq_jax.calibration.METHODS is accepted)
METHODS = ("rtn", "qlora", "gptq", "loftq", "apiq-lw", "apiq-bw")


def _shared_default() -> Path:
    env = os.environ.get("APIQ_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _load(shared: Path, nsamples: int):
    import numpy as np

    from apiq_jax.models import load_pretrained

    model_dir = shared / "models" / "stories260K"
    data = shared / "data" / "tinystories260K"
    for p in (model_dir / "config.json", data / "calib.npy", data / "eval.npy"):
        if not p.is_file():
            raise SystemExit(f"benchmark input not found: {p} (pass --shared DIR or set APIQ_SHARED)")
    model = load_pretrained(model_dir)
    calib = np.load(data / "calib.npy")
    if nsamples > calib.shape[0]:
        raise SystemExit(f"--nsamples {nsamples} exceeds the {calib.shape[0]} calibration rows")
    return model.params, model.config, calib[:nsamples].astype(np.int32), np.load(data / "eval.npy").astype(np.int32)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    """Run one calibration (or the fp32 baseline) and print its row as JSON.

    Args:
        args: the parsed arguments, with ``--worker METHOD`` and ``--one-bits B``.

    Returns:
        None; prints ``ROW {json}`` on stdout.
    """
    from apiq_jax.calibration import get_method
    from apiq_jax.compare import calibrate_and_measure, full_precision_row
    from apiq_jax.lora import LoraConfig
    from apiq_jax.quant import QuantConfig

    params, config, calib, eval_ids = _load(Path(args.shared), args.nsamples)
    rss_loaded = _peak_rss_mb()
    if args.worker == "fp32":
        row = full_precision_row(params, config, eval_ids)
    else:
        scheme = get_method(args.worker).default_scheme
        qcfg = QuantConfig(bits=args.one_bits, group_size=args.group_size, scheme=scheme)
        row = calibrate_and_measure(args.worker, params, config, calib, eval_ids, qcfg,
                                    LoraConfig(rank=args.rank, alpha=args.alpha), seed=args.seed,
                                    epochs=args.epochs, progress=False)
    row["peak_rss_mb"] = _peak_rss_mb()
    row["rss_after_load_mb"] = rss_loaded
    print("ROW " + json.dumps(row))


def _run_worker(args: argparse.Namespace, method: str, bits: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--one-bits", str(bits), "--shared", str(args.shared),
           "--nsamples", str(args.nsamples), "--epochs", str(args.epochs), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--group-size", str(args.group_size), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{method} {bits}-bit failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")][-1]
    row = json.loads(line[4:])
    row["process_seconds"] = time.perf_counter() - t0
    return row


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(_shared_default()))
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_calibration"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-bits", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def _table(args: argparse.Namespace, rows: list[dict]) -> str:
    """The Markdown results table with its settings and environment lines."""
    import importlib.metadata as md

    import jax

    from apiq_jax.calibration import get_method

    header = (f"stories260K (5 blocks, d=64, MLP 172), calibration {args.nsamples} x 256 tokens of "
              f"data/tinystories260K/calib.npy, evaluation 125 x 256 tokens of eval.npy; group "
              f"{args.group_size}, LoRA r={args.rank} alpha={args.alpha:g}, ApiQ epochs {args.epochs}, "
              f"LoftQ {get_method('loftq').compare_options['num_iter']} iterations, seed {args.seed}")
    env = (f"{datetime.date.today().isoformat()}, CPU ({platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores), jax {jax.__version__}, apiq-jax {md.version('apiq-jax')}")
    lines = [header, "", env, "",
             "| bits | method | bits/param | perplexity | mean act. error | calib. s | peak RSS MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['label']} | {_fmt(r['bits_per_param'], '.3f', '32')} | {r['perplexity']:.3f} | "
            f"{_fmt(r['mean_activation_error'], '.4g')} | {_fmt(r['seconds'], '.1f')} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every (bits, method) calibration in its own process, print the table, write the results.

    Returns:
        None; writes ``results.json`` and ``calibration.png`` under ``--out``.
    """
    args = _parser().parse_args()
    if args.worker:
        worker(args)
        return

    from tqdm import tqdm

    from apiq_jax.calibration import METHODS as REGISTRY

    bits_list = [int(b) for b in args.bits.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; accepted: {', '.join(REGISTRY)}")
    jobs = [("fp32", 0)] + [(m, b) for b in bits_list for m in methods]
    rows = []
    for method, bits in tqdm(jobs, desc="calibrations", file=sys.stderr):
        row = _run_worker(args, method, bits)
        row["bits"] = bits or 32
        rows.append(row)
    print(_table(args, rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    png = _plot(rows, bits_list, methods, out / "calibration.png")
    print(f"\nwrote {out / 'results.json'}" + (f" and {png}" if png else ""))


def _plot(rows: list[dict], bits_list: list[int], methods: list[str], path: Path) -> Path | None:
    """Perplexity and mean activation error against the bit width, one line per method."""
    try:
        from apiq_jax.plotting import pyplot, save_figure

        plt = pyplot()
    except ImportError:  # pragma: no cover
        return None
    fp = next(r for r in rows if r["method"] == "fp32")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        rs = [next(r for r in rows if r["method"] == m and r["bits"] == b) for b in bits_list]
        ax0.plot(bits_list, [r["perplexity"] for r in rs], "o-", label=rs[0]["label"])
        ax1.plot(bits_list, [r["mean_activation_error"] for r in rs], "o-", label=rs[0]["label"])
    ax0.axhline(fp["perplexity"], color="k", ls="--", label="full precision")
    for ax, name in ((ax0, "perplexity (eval.npy)"), (ax1, "mean activation error")):
        ax.set_yscale("log")
        ax.set_xticks(bits_list)
        ax.set_xlabel("weight bits")
        ax.set_ylabel(name)
    ax0.legend(fontsize=8)
    fig.suptitle("stories260K: calibration methods by bit width")
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
