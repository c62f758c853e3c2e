"""ApiQ-bw calibration time, this checkout beside a baseline checkout, alternating in one run.

Each measurement is a fresh process that loads the model, runs ``apiq_bw`` twice (the first
run includes compilation; the second is the steady time) and prints both. The trees
alternate ``--repeats`` times; the table shows medians.

    python benchmarks/calibration_time.py --baseline-tree OLD_CHECKOUT [--repeats 3] \
        [--shared DIR] [--nsamples 16] [--seqlen 128] [--epochs 2]

Models: stories260K (from ``--shared``, default ``$APIQ_SHARED`` or ``../shared``) and the
bundled demo model (its own calibration data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
import jax, numpy as np
from apiq_jax.calibration import ApiQOptions, apiq_bw
from apiq_jax.lora import LoraConfig
from apiq_jax.models import load_pretrained
from apiq_jax.quant import QuantConfig
model_dir, ids_path, n, s, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = load_pretrained(model_dir, dtype="float32")
ids = np.load(ids_path)[:n, :s]
times = []
for _ in range(2):
    t = time.perf_counter()
    res = apiq_bw(model.params, model.config, ids, QuantConfig(bits=2, group_size=64), LoraConfig(rank=8, alpha=16),
                  key=jax.random.key(0), options=ApiQOptions(epochs=epochs))
    jax.block_until_ready(jax.tree.leaves(res.lora))
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "steady": times[1]}))
"""


def run_once(tree: Path, model_dir: Path, ids: Path, n: int, s: int, epochs: int) -> dict:
    """One fresh-process measurement with the library of ``tree``.

    Args:
      tree: the checkout whose ``apiq_jax`` is imported.
      model_dir: the HF model.
      ids: calibration ids ``.npy`` (2-D).
      n: samples.
      s: tokens per sample.
      epochs: ApiQ epochs.

    Returns:
      ``{"first", "steady"}`` seconds.
    """
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), str(ids), str(n), str(s), str(epochs)],
                       capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    """Run the alternating measurements and print the table.

    Returns:
      The exit code.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-tree", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("APIQ_SHARED", REPO.parent / "shared")))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    import tempfile

    import numpy as np

    from apiq_jax.data import windows
    from apiq_jax.demo_data import DEMO_MODEL_DIR, demo_text

    demo_calib = Path(tempfile.mkdtemp()) / "demo_calib.npy"
    np.save(demo_calib, windows(demo_text("calib"), seqlen=args.seqlen, tokenizer=DEMO_MODEL_DIR,
                                nsamples=args.nsamples, seed=0))
    models = {"stories260K": (args.shared / "models" / "stories260K", args.shared / "data" / "tinystories260K" / "calib.npy"),
              "demo model": (DEMO_MODEL_DIR, demo_calib)}
    results: dict = {}
    for _ in range(args.repeats):
        for name, (model_dir, ids) in models.items():
            for tree_name, tree in (("this checkout", REPO), ("baseline", args.baseline_tree)):
                r = run_once(tree, model_dir, ids, args.nsamples, args.seqlen, args.epochs)
                results.setdefault((name, tree_name), []).append(r)
                print(json.dumps({"model": name, "tree": tree_name, **r}), flush=True)
    print(f"\nApiQ-bw, 2 bits, rank 8, {args.nsamples} x {args.seqlen} tokens, {args.epochs} epochs; "
          f"median of {args.repeats} alternating runs")
    print("| model | code | first run (compile included) s | steady run s | steady vs baseline |")
    print("|---|---|---|---|---|")
    for name in models:
        base = statistics.median(r["steady"] for r in results[(name, "baseline")])
        for tree_name in ("this checkout", "baseline"):
            rs = results[(name, tree_name)]
            first = statistics.median(r["first"] for r in rs)
            steady = statistics.median(r["steady"] for r in rs)
            print(f"| {name} | {tree_name} | {first:.2f} | {steady:.2f} | {steady / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
