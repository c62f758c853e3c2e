"""The bits x rank sweep: every initialisation, before and after a short LoRA finetune, on two models.

For each model (stories260K from the shared folder, the bundled demo model), each bit width
and each LoRA rank it calibrates with RTN, QLoRA, LoftQ, CLoQ, ApiQ-lw, ApiQ-bw and ApiQ-bw
started from LoftQ's and from CLoQ's closed form (``ApiQOptions.lora_init``), the three ApiQ-bw
variants also on the NormalFloat grid the baselines store (optional columns), and measures
perplexity, the mean per-block activation error and the KL divergence of the next-token
distribution from the full-precision model's on held-out windows, then finetunes the
LoRA factors (the demo's schedule: 50 steps, batch 8, peak LR 3e-4, 10 warm-up steps, cosine) and
measures perplexity again. Every ApiQ variant gets the same calibration windows and epochs.

With ``--seeds 0,1,2`` every row is run once per seed: the seed draws the calibration windows
(stories260K: the seed-th block of ``--nsamples`` rows of ``calib.npy``, disjoint between seeds;
demo: random windows of the calibration text), QLoRA's random ``a`` and the finetuning order. The
tables then show the geometric mean over seeds (the perplexity of the mean loss) and the spread,
and the figures are counted on the means as well as per seed.

Every finished row is appended to ``rows.jsonl`` under ``--out`` at once, so an interrupted
sweep resumes where it stopped (rows whose settings differ are refused, not mixed). At the end
it prints one Markdown table per model, checks the issue's figures (also on the NF grid, on
either grid and on KL), says how often activation error and perplexity order two variants
alike, gives the full-precision perplexity at logit temperature 0.95 / 1.05 as a yardstick,
and draws a heat map per model (``sweep_<model>.png``).

    python benchmarks/sweep.py [--models stories260K,demo] [--bits 2,3] [--ranks 4,8,16,32]
        [--nsamples 32] [--seqlen 256] [--epochs 5] [--eval-windows 16] [--finetune-steps 50] [--finetune-batch 8]
        [--seeds 0] [--out benchmarks/sweep] [--shared DIR] [--report-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

#: (key, label, registry method, ApiQOptions.lora_init or None, quantizer scheme or None for the method's
#: default), in table order. The "(NF)" ApiQ variants learn the clipping of the NormalFloat grid that QLoRA,
#: LoftQ and CLoQ store; they are optional columns (a cell counts without them).
VARIANTS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("rtn", "RTN", "rtn", None, None),
    ("qlora", "QLoRA", "qlora", None, None),
    ("loftq", "LoftQ", "loftq", None, None),
    ("cloq", "CLoQ", "cloq", None, None),
    ("apiq-lw", "ApiQ-lw", "apiq-lw", "default", None),
    ("apiq-bw", "ApiQ-bw", "apiq-bw", "default", None),
    ("apiq-bw+loftq", "ApiQ-bw from LoftQ", "apiq-bw", "loftq", None),
    ("apiq-bw+cloq", "ApiQ-bw from CLoQ", "apiq-bw", "cloq", None),
    ("apiq-bw-nf", "ApiQ-bw (NF)", "apiq-bw", "default", "nf"),
    ("apiq-bw-nf+loftq", "ApiQ-bw (NF) from LoftQ", "apiq-bw", "loftq", "nf"),
    ("apiq-bw-nf+cloq", "ApiQ-bw (NF) from CLoQ", "apiq-bw", "cloq", "nf"),
)
BASELINES = ("rtn", "qlora", "loftq", "cloq")
APIQ = ("apiq-lw", "apiq-bw", "apiq-bw+loftq", "apiq-bw+cloq", "apiq-bw-nf", "apiq-bw-nf+loftq", "apiq-bw-nf+cloq")
#: the variants every counted cell has (those on the method's own grid; the NF ApiQ ones are optional)
REQUIRED = tuple(v[0] for v in VARIANTS if v[4] is None)
#: plain ApiQ-bw and its two started variants, on the method's grid and on the NF grid
BW = ("apiq-bw", "apiq-bw+loftq", "apiq-bw+cloq")
NF_BW = ("apiq-bw-nf", "apiq-bw-nf+loftq", "apiq-bw-nf+cloq")
MODELS = ("stories260K", "demo")
#: the demo's finetuning schedule (apiq_jax.commands.demo)
FINETUNE_BATCH, FINETUNE_LR, FINETUNE_WARMUP = 8, 3e-4, 10


def _shared_default() -> Path:
    env = os.environ.get("APIQ_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def load_model(name: str, args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """A model and its data: calibration, evaluation and finetuning windows.

    Args:
      name: "stories260K" (``--shared``/models/stories260K with data/tinystories260K) or "demo"
        (the bundled model and held-out Python stdlib text, as ``apiq-jax demo``).
      args: the parsed arguments.
      seed: which calibration windows: stories260K's rows ``seed * n .. (seed + 1) * n - 1`` of
        ``calib.npy`` (``n = --nsamples``); the demo's windows sampled with this seed.

    Returns:
      ``{"params", "config", "calib", "eval", "train"}`` (int32 windows of ``--seqlen`` tokens).

    Raises:
      SystemExit: an input file is missing, or stories260K has too few rows for the seed.
    """
    import numpy as np

    from apiq_jax.data import sample_windows, split_windows, tokenize
    from apiq_jax.models import load_pretrained, load_tokenizer

    if name == "stories260K":
        shared = Path(args.shared)
        model_dir, data = shared / "models" / "stories260K", shared / "data" / "tinystories260K"
        for p in (model_dir / "config.json", data / "calib.npy", data / "eval.npy"):
            if not p.is_file():
                raise SystemExit(f"sweep input not found: {p} (pass --shared DIR or set APIQ_SHARED)")
        model = load_pretrained(model_dir)
        calib_all = np.load(data / "calib.npy").astype(np.int32)
        lo, hi = seed * args.nsamples, (seed + 1) * args.nsamples
        if hi > len(calib_all):
            raise SystemExit(f"--seeds: seed {seed} needs calibration rows {lo}..{hi - 1} but {data / 'calib.npy'} "
                             f"has {len(calib_all)}; accepted seeds: 0..{len(calib_all) // args.nsamples - 1}")
        calib = calib_all[lo:hi, : args.seqlen]
        eval_ids = np.load(data / "eval.npy").astype(np.int32)[: args.eval_windows, : args.seqlen]
        train = calib_all[:, : args.seqlen]
    else:
        from apiq_jax.demo_data import DEMO_MODEL_DIR, demo_text

        model = load_pretrained(DEMO_MODEL_DIR)
        tok = load_tokenizer(DEMO_MODEL_DIR)
        stream = tokenize(demo_text("calib"), tok)
        calib = sample_windows(stream, args.nsamples, args.seqlen, seed=seed, name="demo calibration text")
        eval_ids = split_windows(tokenize(demo_text("eval"), tok), args.seqlen, name="demo evaluation text")
        eval_ids = eval_ids[: args.eval_windows]
        train = split_windows(stream, args.seqlen)
    return {"params": model.params, "config": model.config, "calib": np.asarray(calib, np.int32),
            "eval": np.asarray(eval_ids, np.int32), "train": np.asarray(train, np.int32)}


def run_variant(data: dict[str, Any], variant: tuple[str, str, str, str | None, str | None], bits: int, rank: int,
                args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Calibrate one variant, measure it, finetune its LoRA, measure again: one row.

    Args:
      data: :func:`load_model`'s output.
      variant: an entry of :data:`VARIANTS`.
      bits: weight bits.
      rank: LoRA rank (alpha = 2 * rank: the scale alpha / r is 2 at every rank).
      args: the parsed arguments.
      seed: QLoRA's random ``a`` and the finetuning order (the data's seed is ``data``'s).

    Returns:
      The row (perplexity before/after finetuning, mean activation error, the mean KL divergence of the
      next-token distribution from the full-precision model's, seconds, seed).
    """
    import jax
    import numpy as np

    from apiq_jax.calibration import ApiQOptions, get_method
    from apiq_jax.calibration.registry import LOFTQ_COMPARE_ITERATIONS
    from apiq_jax.compare import EVAL_BATCH, quantized_bits_per_param
    from apiq_jax.evaluate import activation_errors, kl_divergence, perplexity_ids
    from apiq_jax.lora import LoraConfig
    from apiq_jax.quant import QuantConfig
    from apiq_jax.training import FinetuneConfig, finetune

    key, label, method, lora_init, scheme = variant
    spec = get_method(method)
    qcfg = QuantConfig(bits=bits, group_size=args.group_size, scheme=scheme or spec.default_scheme)
    lcfg = LoraConfig(rank=rank, alpha=2.0 * rank)
    opts: dict[str, Any] = {}
    if spec.trains:
        opts["options"] = ApiQOptions(epochs=args.epochs, lora_init=lora_init)
    elif method == "loftq":
        opts["num_iter"] = LOFTQ_COMPARE_ITERATIONS
    params, config = data["params"], data["config"]
    t0 = time.perf_counter()
    if not spec.trains:
        opts["measure_error"] = False  # measured below on the held-out windows, as for ApiQ
    res = spec.fn(params, config, data["calib"], qcfg, lcfg, key=jax.random.PRNGKey(seed), **opts)
    calib_s = time.perf_counter() - t0
    ppl = perplexity_ids(res.params, data["eval"], config=config, lora=res.lora, batch_size=EVAL_BATCH).perplexity
    errs = activation_errors(params, res.params, data["eval"], config=config, lora=res.lora, batch_size=EVAL_BATCH)
    kl = kl_divergence(params, res.params, data["eval"], config=config, lora=res.lora, batch_size=EVAL_BATCH)
    row = {"variant": key, "label": label, "method": method, "lora_init": lora_init, "scheme": qcfg.scheme,
           "bits": bits, "rank": rank, "bits_per_param": quantized_bits_per_param(res.params), "perplexity": ppl,
           "mean_activation_error": float(np.mean(errs)), "activation_errors": [float(e) for e in errs],
           "kl_to_full_precision": kl, "calib_seconds": calib_s, "seed": seed}
    if args.finetune_steps:
        steps = args.finetune_steps
        fcfg = FinetuneConfig(steps=steps, batch_size=args.finetune_batch, learning_rate=FINETUNE_LR,
                              warmup_steps=min(FINETUNE_WARMUP, steps), seed=seed)
        lora, _ = finetune(res.params, res.lora, data["train"], config, fcfg)
        row["perplexity_finetuned"] = perplexity_ids(res.params, data["eval"], config=config, lora=lora,
                                                     batch_size=EVAL_BATCH).perplexity
    row["seconds"] = time.perf_counter() - t0
    return row


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("nsamples", "seqlen", "epochs", "eval_windows", "finetune_steps", "finetune_batch", "group_size")
    return {k: getattr(args, k) for k in keys}


def row_seed(row: dict[str, Any]) -> int:
    """The seed a row was run with (rows written before ``--seeds`` kept it in their settings; else 0)."""
    return int(row.get("seed", row.get("settings", {}).get("seed", 0)))


def _load_rows(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        if {k: v for k, v in r["settings"].items() if k != "seed"} != settings:
            raise SystemExit(f"{path} holds rows of other settings ({r['settings']}); pass another --out or the "
                             f"same settings to resume")
    return rows


def _cell(rows: list[dict[str, Any]], model: str, bits: int, rank: int) -> dict[str, dict[str, Any]]:
    """One (bits, rank) cell: per variant, its row, or over several seeds the mean row.

    Perplexities are averaged geometrically (the perplexity of the mean loss over seeds), activation
    errors and KL divergences (rows that have them) arithmetically; ``seeds`` lists the seeds and
    ``perplexity_range`` the (min, max).
    """
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["model"] == model and r["bits"] == bits and r["rank"] == rank:
            by.setdefault(r["variant"], []).append(r)
    cell = {}
    for k, rs in by.items():
        mean = {"seeds": sorted(row_seed(r) for r in rs),
                "perplexity_range": (min(r["perplexity"] for r in rs), max(r["perplexity"] for r in rs)),
                "mean_activation_error": sum(r["mean_activation_error"] for r in rs) / len(rs)}
        for field in ("perplexity", "perplexity_finetuned"):
            if all(field in r for r in rs):
                mean[field] = math.exp(sum(math.log(r[field]) for r in rs) / len(rs))
        if all("kl_to_full_precision" in r for r in rs):
            mean["kl_to_full_precision"] = sum(r["kl_to_full_precision"] for r in rs) / len(rs)
        cell[k] = mean
    return cell


def table(rows: list[dict[str, Any]], model: str, bits_list: list[int], ranks: list[int]) -> str:
    """Markdown table of one model: a row per (bits, rank), perplexity before -> after finetuning per variant.

    Args:
      rows: the sweep's rows.
      model: the model name.
      bits_list, ranks: the grid.

    Returns:
      The table (over several seeds, the geometric mean of each variant's perplexities), the same table
      of mean activation errors, and with several seeds a table of each perplexity's lowest-highest.
    """
    head = "| bits | rank | " + " | ".join(v[1] for v in VARIANTS) + " |"
    lines = [head, "|---:|---:|" + "---:|" * len(VARIANTS)]
    spreads: list[str] = []
    kls = ["", "mean KL divergence from the full-precision next-token distribution, nats per token (held-out "
           "windows; rows that measured it):", "", lines[0], lines[1]]
    errs = ["", "mean activation error (held-out windows):", "",
            "| bits | rank | " + " | ".join(v[1] for v in VARIANTS) + " |", "|---:|---:|" + "---:|" * len(VARIANTS)]
    for b in bits_list:
        for r in ranks:
            c = _cell(rows, model, b, r)
            best_b = min((c[k]["perplexity"] for k in BASELINES if k in c), default=math.nan)
            cells, ecells = [], []
            for k, *_ in VARIANTS:
                if k not in c:
                    cells.append("-")
                    ecells.append("-")
                    continue
                p, f = c[k]["perplexity"], c[k].get("perplexity_finetuned")
                s = f"{p:.2f}" + ("" if f is None else f" → {f:.2f}")
                cells.append(f"**{s}**" if k in APIQ and p <= best_b else s)
                ecells.append(f"{c[k]['mean_activation_error']:.3f}")
            lines.append(f"| {b} | {r} | " + " | ".join(cells) + " |")
            errs.append(f"| {b} | {r} | " + " | ".join(ecells) + " |")
            kls.append(f"| {b} | {r} | " + " | ".join(
                f"{c[k]['kl_to_full_precision']:.4f}" if "kl_to_full_precision" in c.get(k, {}) else "-"
                for k, *_ in VARIANTS) + " |")
            spreads.append(f"| {b} | {r} | " + " | ".join(
                f"{c[k]['perplexity_range'][0]:.2f}-{c[k]['perplexity_range'][1]:.2f}" if k in c else "-"
                for k, *_ in VARIANTS) + " |")
    seeds = sorted({row_seed(r) for r in rows if r["model"] == model})
    if len(seeds) > 1:
        errs += ["", f"perplexity after calibration, lowest-highest over seeds {seeds}:", "", lines[0], lines[1],
                 *spreads]
    if any("kl_to_full_precision" in r for r in rows if r["model"] == model):
        errs += kls
    return "\n".join(lines + errs)


def figures(rows: list[dict[str, Any]], model: str, bits_list: list[int], ranks: list[int]) -> dict[str, Any]:
    """The issue's figures on one model.

    Args:
      rows: the sweep's rows.
      model: the model name.
      bits_list, ranks: the grid.

    Returns:
      ``{"apiq_best_before": k, "apiq_best_after": k, "started_beats_plain": k, "cells": n}``: in how many of
      the n cells the best ApiQ variant is at or below the best baseline (before / after finetuning), and
      ApiQ-bw from LoftQ or CLoQ is at or below plain ApiQ-bw (before finetuning). With several seeds the
      cells' mean perplexities are compared, and a cell counts once every required variant has the same seeds.
      Where the n cells hold the three ApiQ-bw (NF) variants too (``nf_cells`` of them, same seeds), also
      ``started_beats_plain_nf`` (the same comparison on the NF grid) and ``started_beats_plain_either_grid``
      (the best started ApiQ-bw of both grids against the best plain one of both grids). Where ApiQ-bw and
      its started variants measured the KL divergence (``kl_cells``), ``started_beats_plain_kl``: the same
      comparison as ``started_beats_plain`` on the mean KL divergence from the full-precision model.
    """
    out = {"apiq_best_before": 0, "apiq_best_after": 0, "started_beats_plain": 0, "cells": 0}
    nf = {"started_beats_plain_nf": 0, "started_beats_plain_either_grid": 0, "nf_cells": 0}
    kl = {"started_beats_plain_kl": 0, "kl_cells": 0}
    for b in bits_list:
        for r in ranks:
            c = _cell(rows, model, b, r)
            if not all(k in c for k in REQUIRED) or len({tuple(c[k]["seeds"]) for k in REQUIRED}) != 1:
                continue
            if all(k in c and c[k]["seeds"] == c["apiq-bw"]["seeds"] for k in NF_BW):
                nf["nf_cells"] += 1
                nf["started_beats_plain_nf"] += _started_at_or_below_plain(c, "perplexity", NF_BW)
                nf["started_beats_plain_either_grid"] += _started_at_or_below_plain(c, "perplexity", BW, NF_BW)
            out["cells"] += 1
            for field, name in (("perplexity", "apiq_best_before"), ("perplexity_finetuned", "apiq_best_after")):
                if all(field in c[k] for k in c):
                    if min(c[k][field] for k in APIQ if k in c) <= min(c[k][field] for k in BASELINES):
                        out[name] += 1
            out["started_beats_plain"] += _started_at_or_below_plain(c, "perplexity", BW)
            if all("kl_to_full_precision" in c[k] for k in BW):
                kl["kl_cells"] += 1
                kl["started_beats_plain_kl"] += _started_at_or_below_plain(c, "kl_to_full_precision", BW)
    return {**out, **(nf if nf["nf_cells"] else {}), **(kl if kl["kl_cells"] else {})}


def _started_at_or_below_plain(cell: dict[str, dict[str, Any]], field: str, *grids: tuple[str, ...]) -> bool:
    """Is the best started ApiQ-bw of ``grids`` at or below the best plain one (``grid[0]``) on ``field``?"""
    return (min(cell[k][field] for g in grids for k in g[1:])
            <= min(cell[g[0]][field] for g in grids))


def order_agreement(rows: list[dict[str, Any]], model: str, bits: int) -> tuple[int, int]:
    """How often activation error and perplexity put two variants in the same order.

    Pairs are taken within each (rank, seed) at ``bits`` (every variant against every other, ties
    in either quantity left out). Where the agreement is near 1/2, perplexity differences between
    variants say nothing about how well each reproduces the full-precision activations, the
    quantity every ApiQ variant and CLoQ minimise.

    Args:
      rows: the sweep's rows (one per seed; not means).
      model: the model name.
      bits: the bit width.

    Returns:
      ``(agreeing, pairs)``.
    """
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["model"] == model and r["bits"] == bits:
            groups.setdefault((r["rank"], row_seed(r)), []).append(r)
    agree = pairs = 0
    for rs in groups.values():
        for i, x in enumerate(rs):
            for y in rs[i + 1:]:
                dp = x["perplexity"] - y["perplexity"]
                de = x["mean_activation_error"] - y["mean_activation_error"]
                if dp and de:
                    pairs += 1
                    agree += (dp > 0) == (de > 0)
    return agree, pairs


def temperature_perplexities(params: Any, config: Any, eval_ids: Any,
                             temperatures: tuple[float, ...] = (0.95, 1.0, 1.05)) -> dict[float, float]:
    """The full-precision model's perplexity with its logits divided by each temperature.

    A yardstick for the table: how much perplexity moves when nothing changes but the sharpness of
    the next-token distribution (a quantization error can sharpen or flatten it a little).

    Args:
      params: the dense params.
      config: the model config.
      eval_ids: evaluation windows ``[n, seqlen]``.
      temperatures: the temperatures.

    Returns:
      ``{temperature: perplexity}`` (at 1.0 the model's own perplexity).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from apiq_jax.models.llama import forward

    ids = jnp.asarray(eval_ids)
    logits = jnp.asarray(forward(params, None, ids, config), jnp.float32)[:, :-1]
    out = {}
    for t in temperatures:
        logp = jax.nn.log_softmax(logits / t, axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
        out[t] = float(np.exp(np.mean(np.asarray(nll, np.float64))))
    return out


def row_places(values: Any) -> Any:
    """Each value's place in its row, 1 for the lowest (NaN stays NaN and ranks after every number).

    Args:
      values: ``[rows, cols]`` float array with NaN for missing cells.

    Returns:
      Float array of the same shape: 1, 2, ... per row (ties in column order), NaN where missing.
    """
    import numpy as np

    m = np.asarray(values, float)
    filled = np.where(np.isfinite(m), m, np.inf)
    return np.where(np.isfinite(m), filled.argsort(axis=1, kind="stable").argsort(axis=1) + 1.0, np.nan)


def heatmap(rows: list[dict[str, Any]], model: str, bits_list: list[int], ranks: list[int], path: Path,
            fp_ppl: float) -> Path | None:
    """Heat map of every variant's perplexity per (bits, rank) row, before and after finetuning.

    The colour is the variant's place in its row (1 = lowest perplexity), so the 3-bit rows, where
    every method is within a few percent, read as clearly as the 2-bit ones; the perplexities are
    written in the cells and the best of each row is outlined.

    Args:
      rows: the sweep's rows.
      model: the model name.
      bits_list, ranks: the grid.
      path: the PNG to write.
      fp_ppl: the full-precision perplexity (in the title).

    Returns:
      The path, or None without matplotlib.
    """
    import numpy as np

    try:
        from apiq_jax.plotting import pyplot, save_figure

        plt = pyplot()
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    ylabels = [f"{b}-bit r={r}" for b in bits_list for r in ranks]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.45 * len(ylabels) + 2.5))
    for ax, field, title in ((axes[0], "perplexity", "after calibration"),
                             (axes[1], "perplexity_finetuned", "after LoRA finetuning")):
        m = np.full((len(ylabels), len(VARIANTS)), np.nan)
        for i, (b, r) in enumerate((b, r) for b in bits_list for r in ranks):
            c = _cell(rows, model, b, r)
            for j, (k, *_) in enumerate(VARIANTS):
                if k in c and field in c[k]:
                    m[i, j] = c[k][field]
        best = np.where(np.isfinite(m), m, np.inf).min(axis=1, keepdims=True)
        place = row_places(m)
        im = ax.imshow(place, cmap="viridis", vmin=1, vmax=len(VARIANTS), aspect="auto")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="k" if place[i, j] > len(VARIANTS) / 2 else "w")
                    if m[i, j] == best[i, 0]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="red"))
        ax.set_xticks(range(len(VARIANTS)), [v[1] for v in VARIANTS], rotation=30, ha="right")
        ax.set_yticks(range(len(ylabels)), ylabels)
        ax.set_title(f"{model}: perplexity {title} (full precision {fp_ppl:.2f})")
        fig.colorbar(im, ax=ax, label="place in the row (1 = lowest perplexity)")
    fig.tight_layout()
    return save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--ranks", default="4,8,16,32")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    ap.add_argument("--epochs", type=int, default=5, help="ApiQ epochs, every ApiQ variant (default 5)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--finetune-batch", type=int, default=FINETUNE_BATCH, help=f"default {FINETUNE_BATCH} (the demo's)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each a full run (default 0)")
    ap.add_argument("--shared", default=str(_shared_default()))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "sweep"))
    ap.add_argument("--report-only", action="store_true", help="run nothing: tables and heat maps of the rows so far")
    return ap


def main() -> None:
    """Run the missing rows of the sweep (resumable), then print the tables and figures and draw the heat maps.

    Returns:
      None; writes ``rows.jsonl``, ``sweep.md`` and ``sweep_<model>.png`` under ``--out``.
    """
    args = _parser().parse_args()
    from tqdm import tqdm

    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; accepted: {', '.join(MODELS)}")
    keys = [k for k in args.variants.split(",") if k]
    variants = [v for v in VARIANTS if v[0] in keys]
    if len(variants) != len(keys):
        raise SystemExit(f"--variants: unknown in {keys}; accepted: {', '.join(v[0] for v in VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.isdigit()]
    if not seeds or len(seeds) != len(args.seeds.split(",")):
        raise SystemExit(f"--seeds: {args.seeds!r} is not a comma-separated list of integers >= 0")
    bits_list = [int(b) for b in args.bits.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    rows_path = out / "rows.jsonl"
    rows = _load_rows(rows_path, settings)
    have = {(r["model"], row_seed(r), r["bits"], r["rank"], r["variant"]) for r in rows}
    jobs = [(m, s, b, r, v) for m in models for s in seeds for b in bits_list for r in ranks for v in variants
            if (m, s, b, r, v[0]) not in have and not args.report_only]
    fp: dict[str, float] = {}
    data: dict[tuple[str, int], Any] = {}
    with tqdm(total=len(jobs), desc="sweep", file=sys.stderr) as bar:
        for m, s, b, r, v in jobs:
            if (m, s) not in data:
                data = {(m, s): load_model(m, args, s)}
            bar.set_postfix_str(f"{m} seed {s} {b}-bit r={r} {v[0]}")
            row = run_variant(data[m, s], v, b, r, args, s)
            row.update(model=m, settings=settings)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            bar.update(1)
    import jax

    from apiq_jax.compare import full_precision_row

    env = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, CPU ({platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores), jax {jax.__version__}, python {platform.python_version()}")
    md = [f"settings: {json.dumps(settings)}, seeds {seeds}", "", env, ""]
    for m in models:
        d = load_model(m, args)
        fp[m] = full_precision_row(d["params"], d["config"], d["eval"])["perplexity"]
        mine = [r for r in rows if r["model"] == m and row_seed(r) in seeds]
        fig = figures(mine, m, bits_list, ranks)
        png = heatmap(mine, m, bits_list, ranks, out / f"sweep_{m.lower()}.png", fp[m])
        md += [f"## {m} (full precision {fp[m]:.2f}; calibration {d['calib'].shape}, evaluation {d['eval'].shape})",
               "", table(mine, m, bits_list, ranks), "", f"figures: {json.dumps(fig)}"]
        if len(seeds) > 1:
            md += [f"figures of seed {s} alone: {json.dumps(figures([r for r in mine if row_seed(r) == s], m, bits_list, ranks))}"
                   for s in seeds]
        for name, sel in (("any two variants", mine), ("two ApiQ-bw variants (both grids)",
                                                          [r for r in mine if r["variant"] in (*BW, *NF_BW)])):
            agreement = [(b, *order_agreement(sel, m, b)) for b in bits_list]
            md.append(f"activation error and perplexity order {name} alike (same bits, rank and seed): " + ", ".join(
                f"{b}-bit {a / n:.0%} of {n} pairs" for b, a, n in agreement if n))
        temps = temperature_perplexities(d["params"], d["config"], d["eval"])
        md += ["full-precision perplexity with the logits divided by a temperature: " + ", ".join(
            f"T = {t:g}: {p:.2f}" for t, p in temps.items()), f"heat map: {png}", ""]
    text = "\n".join(md)
    (out / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
