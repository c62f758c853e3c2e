"""Peak RSS of ``apiq-jax quantize`` on random fp16 Llama checkpoints, this checkout beside a baseline.

Every run is a fresh process (whole-process peak RSS, ``RUSAGE_CHILDREN`` of a wrapper that
runs nothing else). The baseline is another checkout of the library (e.g. a ``git worktree``
of an older commit) run with the same interpreter and arguments.

    python benchmarks/quantize_memory.py --sizes 2048x8x5632 2048x40x5632 --method apiq-bw \
        [--baseline-tree OLD_CHECKOUT] [--work DIR] [--plan]

``--plan`` adds the expected peak of ``apiq-jax plan`` (run in a fresh process of this checkout,
as a user runs it) beside the measured one, and their ratio.

Sizes are HIDDENxLAYERSxMLP (vocab 32000, 16 heads); checkpoints are written once under
``--work`` by :mod:`random_checkpoint` and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from random_checkpoint import write_checkpoint  # noqa: E402

_WRAPPER = (
    "import resource, subprocess, sys, json;"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
    "print(json.dumps({'rc': r.returncode, 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
    " 'tail': (r.stdout + r.stderr)[-400:]}))"
)


def measure(tree: Path, model: Path, out: Path, calib: Path, method: str, epochs: int) -> dict:
    """Run ``apiq-jax quantize`` from the checkout ``tree`` in a fresh process; its peak RSS.

    Args:
      tree: the library checkout whose ``apiq_jax`` is imported.
      model: the HF checkpoint.
      out: the output directory (must not exist).
      calib: calibration ids ``.npy``.
      method: the calibration method.
      epochs: ApiQ epochs (ignored for methods that do not train).

    Returns:
      ``{"rc", "peak_mb", "tail"}``.
    """
    args = [sys.executable, "-m", "apiq_jax.cli", "quantize", "--model", str(model), "--method", method,
            "--bits", "2", "--nsamples", "4", "--seqlen", "64", "--calib", str(calib), "--out", str(out), "--quiet"]
    if method.startswith("apiq"):
        args += ["--epochs", str(epochs)]
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, cwd=tree)
    return json.loads(r.stdout.strip().splitlines()[-1])


def plan(model: Path, method: str) -> dict:
    """``apiq-jax plan`` of the same run (this checkout, a fresh process): its expected quantize peak.

    Args:
      model: the HF checkpoint.
      method: the calibration method.

    Returns:
      ``plan``'s ``quantize`` entry (``{"job", "phase", "peak_gib", "parts_gib"}``).
    """
    args = [sys.executable, "-m", "apiq_jax.cli", "plan", "--model", str(model), "--method", method, "--bits", "2",
            "--nsamples", "4", "--seqlen", "64", "--skip", "finetune"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=HERE.parent, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["quantize"]


def packed_layer_mb(hidden: int, mlp: int, bits: int = 2, group: int = 64) -> float:
    """Stored size of one layer's seven 2-bit linears (codes + fp16 scales + int16 zeros), MB.

    Args:
      hidden: hidden size (16 heads, no GQA).
      mlp: MLP width.
      bits: code bits.
      group: group size.

    Returns:
      Megabytes.
    """
    params = 4 * hidden * hidden + 3 * hidden * mlp
    return params * (bits + 32 / group) / 8 / 2**20


def main() -> int:
    """Build the checkpoints, run both trees, print the table.

    Returns:
      The exit code.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2048x8x5632"])
    p.add_argument("--method", default="apiq-bw")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--baseline-tree", type=Path, default=None)
    p.add_argument("--plan", action="store_true", help="also run apiq-jax plan: planned peak and planned/measured")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "apiq_quantize_memory")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 32000, size=(4, 64)).astype(np.int32))
    trees = [("this checkout", HERE.parent)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    rows = []
    for size in args.sizes:
        hidden, layers, mlp = map(int, size.split("x"))
        model = args.work / f"llama_{size}"
        if not (model / "config.json").exists():
            write_checkpoint(model, hidden=hidden, layers=layers, mlp=mlp, vocab=32000, heads=16, kv_heads=16)
        fp16_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
        planned = plan(model, args.method) if args.plan else None
        if planned is not None:
            print(json.dumps({"size": size, "plan": planned}), flush=True)
        for name, tree in trees:
            out = Path(tempfile.mkdtemp(dir=args.work)) / "q"
            res = measure(tree, model, out, calib, args.method, args.epochs)
            rows.append((size, fp16_gb, name, res, planned))
            print(json.dumps({"size": size, "tree": name, **res}), flush=True)
    extra = " plan | plan / measured |" if args.plan else ""
    print(f"\n| model (hidden x layers x mlp) | fp16 on disk | code | {args.method} peak RSS |{extra}")
    print("|---|---|---|---|" + ("---|---|" if args.plan else ""))
    for size, gb, name, res, planned in rows:
        ok = res["rc"] == 0
        peak = f"{res['peak_mb']:.0f} MiB" if ok else f"failed (rc {res['rc']})"
        cells = ""
        if planned is not None:
            plan_mb = planned["peak_gib"] * 1024
            cells = f" {plan_mb:.0f} MiB | {plan_mb / res['peak_mb']:.2f} |" if ok else f" {plan_mb:.0f} MiB | - |"
        print(f"| {size} | {gb:.2f} GiB | {name} | {peak} |{cells}")
    print(f"\npacked 2-bit layer (2048 x 5632): {packed_layer_mb(2048, 5632):.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
