"""benchmarks/sweep.py: the figures it checks and the table it prints, on hand-made rows (no calibration)."""

from __future__ import annotations

import importlib.util

import numpy as np

from tests.conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("sweep", REPO_ROOT / "benchmarks" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _rows(ppl: dict[str, tuple[float, float]], bits: int = 2, rank: int = 8) -> list[dict]:
    return [{"model": "m", "bits": bits, "rank": rank, "variant": k, "perplexity": p, "perplexity_finetuned": f,
             "mean_activation_error": p / 100} for k, (p, f) in ppl.items()]


BASE = {"rtn": (40.0, 30.0), "qlora": (90.0, 50.0), "loftq": (35.0, 20.0), "cloq": (30.0, 18.0)}


def test_figures_count_the_cells_where_apiq_wins():
    win = _rows({**BASE, "apiq-lw": (33.0, 25.0), "apiq-bw": (29.0, 19.0), "apiq-bw+loftq": (28.0, 17.0),
                 "apiq-bw+cloq": (31.0, 18.5)})
    # rank 16: the best ApiQ variant loses before finetuning (31 > 30) and after (18.1 > 18), and
    # neither started variant beats plain ApiQ-bw (32, 33 > 31)
    lose = _rows({**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (31.0, 18.1), "apiq-bw+loftq": (32.0, 18.2),
                  "apiq-bw+cloq": (33.0, 18.3)}, rank=16)
    incomplete = _rows(BASE, rank=32)  # no ApiQ rows yet: not counted
    fig = sweep.figures(win + lose + incomplete, "m", [2], [8, 16, 32])
    assert fig == {"apiq_best_before": 1, "apiq_best_after": 1, "started_beats_plain": 1, "cells": 2}


def test_table_bolds_apiq_at_or_below_the_best_baseline():
    rows = _rows({**BASE, "apiq-lw": (33.0, 25.0), "apiq-bw": (30.0, 19.0), "apiq-bw+loftq": (28.0, 17.0),
                  "apiq-bw+cloq": (31.0, 18.5)})
    text = sweep.table(rows, "m", [2], [8])
    line = next(ln for ln in text.splitlines() if ln.startswith("| 2 | 8 |"))
    cells = [c.strip() for c in line.strip("|").split("|")][2:]
    assert cells[3] == "30.00 → 18.00"  # CLoQ, the best baseline
    assert cells[5] == "**30.00 → 19.00**" and cells[6] == "**28.00 → 17.00**"  # ties count as at or below
    assert cells[4] == "33.00 → 25.00" and cells[7] == "31.00 → 18.50"
    assert "| 2 | 8 | 0.400 | 0.900 | 0.350 | 0.300 | 0.330 | 0.300 | 0.280 | 0.310 |" in text


def test_nf_variants_are_optional_apiq_columns():
    """A cell counts without the ApiQ-bw (NF) rows; with them, an NF variant below every baseline makes the
    cell an ApiQ win, and each NF variant quantizes on the NF grid with its own LoRA start."""
    asym = {**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (31.0, 18.1), "apiq-bw+loftq": (32.0, 18.2),
            "apiq-bw+cloq": (33.0, 18.3)}
    without = sweep.figures(_rows(asym), "m", [2], [8])
    assert without == {"apiq_best_before": 0, "apiq_best_after": 0, "started_beats_plain": 0, "cells": 1}
    with_nf = sweep.figures(_rows({**asym, "apiq-bw-nf+cloq": (29.5, 17.5)}), "m", [2], [8])
    assert with_nf == {"apiq_best_before": 1, "apiq_best_after": 1, "started_beats_plain": 0, "cells": 1}
    nf = {v[0]: v for v in sweep.VARIANTS if v[0].startswith("apiq-bw-nf")}
    assert {k: (v[2], v[3], v[4]) for k, v in nf.items()} == {
        "apiq-bw-nf": ("apiq-bw", "default", "nf"), "apiq-bw-nf+loftq": ("apiq-bw", "loftq", "nf"),
        "apiq-bw-nf+cloq": ("apiq-bw", "cloq", "nf")}
    assert set(nf) <= set(sweep.APIQ) and not set(nf) & set(sweep.REQUIRED)


def test_started_against_plain_on_the_nf_grid_and_on_either_grid():
    """Asymmetric grid: plain ApiQ-bw ahead (28 < 29, 30). NF grid: started ahead (26 <= 27). Either grid: the
    best started (26) against the best plain (27, NF) counts; without all three NF rows no NF figures."""
    asym = {**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (28.0, 18.1), "apiq-bw+loftq": (29.0, 18.2),
            "apiq-bw+cloq": (30.0, 18.3)}
    nf = {"apiq-bw-nf": (27.0, 18.0), "apiq-bw-nf+loftq": (26.0, 17.9), "apiq-bw-nf+cloq": (26.5, 17.8)}
    fig = sweep.figures(_rows({**asym, **nf}), "m", [2], [8])
    assert fig["started_beats_plain"] == 0
    assert fig["started_beats_plain_nf"] == 1 and fig["started_beats_plain_either_grid"] == 1 and fig["nf_cells"] == 1
    worse_nf = {**nf, "apiq-bw-nf+loftq": (27.5, 17.9), "apiq-bw-nf+cloq": (27.2, 17.8)}  # 27.2 > 27 and 27.2 > 26
    fig = sweep.figures(_rows({**asym, **worse_nf}, rank=16) + _rows({**asym, **nf}), "m", [2], [8, 16])
    assert (fig["started_beats_plain_nf"], fig["started_beats_plain_either_grid"], fig["nf_cells"]) == (1, 1, 2)
    assert "nf_cells" not in sweep.figures(_rows({**asym, "apiq-bw-nf": (27.0, 18.0)}), "m", [2], [8])


def test_kl_divergence_is_averaged_tabled_and_counted_where_measured():
    """Rows with ``kl_to_full_precision`` get a KL table and the started-vs-plain count on KL (here the started
    variant's KL is lower although its perplexity is higher); rows without it get neither."""
    asym = {**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (28.0, 18.1), "apiq-bw+loftq": (29.0, 18.2),
            "apiq-bw+cloq": (30.0, 18.3)}
    kl = {"apiq-bw": (0.02, 0.04), "apiq-bw+loftq": (0.01, 0.02), "apiq-bw+cloq": (0.03, 0.05)}
    rows = []
    for seed in (0, 1):
        rows += [{**r, "seed": seed, **({"kl_to_full_precision": kl[r["variant"]][seed]} if r["variant"] in kl else {})}
                 for r in _rows(asym)]
    cell = sweep._cell(rows, "m", 2, 8)
    assert abs(cell["apiq-bw"]["kl_to_full_precision"] - 0.03) < 1e-12 and "kl_to_full_precision" not in cell["rtn"]
    fig = sweep.figures(rows, "m", [2], [8])
    assert fig["started_beats_plain"] == 0 and fig["started_beats_plain_kl"] == 1 and fig["kl_cells"] == 1
    text = sweep.table(rows, "m", [2], [8])
    assert "| 2 | 8 | - | - | - | - | - | 0.0300 | 0.0150 | 0.0400 | - | - | - |" in text
    plain = [{k: v for k, v in r.items() if k != "kl_to_full_precision"} for r in rows]
    assert "kl_cells" not in sweep.figures(plain, "m", [2], [8]) and "KL" not in sweep.table(plain, "m", [2], [8])


def test_order_agreement_counts_pairs_ordered_alike_by_error_and_perplexity():
    rows = [{"model": "m", "bits": 3, "rank": 4, "seed": 0, "variant": k, "perplexity": p, "mean_activation_error": e}
            for k, p, e in (("a", 10.0, 0.1), ("b", 11.0, 0.2), ("c", 10.5, 0.05), ("d", 10.5, 0.3))]
    # pairs: ab agree, ac disagree, ad agree, bc agree, bd disagree, cd tie in perplexity (left out)
    assert sweep.order_agreement(rows, "m", 3) == (3, 5)
    other_seed = [{**r, "seed": 1, "variant": "x"} for r in rows[:1]]  # alone in its (rank, seed): no pair
    assert sweep.order_agreement(rows + other_seed, "m", 3) == (3, 5)
    assert sweep.order_agreement(rows, "m", 2) == (0, 0)


def _seeded(ppl: dict[str, tuple[float, float]], seed: int, rank: int = 8) -> list[dict]:
    return [{**r, "seed": seed} for r in _rows(ppl, rank=rank)]


def test_several_seeds_are_compared_on_their_geometric_means():
    """Seed 0 alone has plain ApiQ-bw ahead of both started variants; over seeds 0 and 1 the started one is
    ahead on the mean (geometric: exp of the mean log perplexity), so the mean figure counts it."""
    s0 = _seeded({**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (25.0, 17.0), "apiq-bw+loftq": (26.0, 17.5),
                  "apiq-bw+cloq": (27.0, 18.0)}, 0)
    s1 = _seeded({**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (36.0, 19.0), "apiq-bw+loftq": (25.0, 17.0),
                  "apiq-bw+cloq": (28.0, 18.0)}, 1)
    cell = sweep._cell(s0 + s1, "m", 2, 8)
    assert cell["apiq-bw"]["seeds"] == [0, 1]
    assert abs(cell["apiq-bw"]["perplexity"] - 30.0) < 1e-12  # sqrt(25 * 36)
    assert abs(cell["apiq-bw+loftq"]["perplexity_finetuned"] - (17.5 * 17.0) ** 0.5) < 1e-12
    assert cell["apiq-bw"]["perplexity_range"] == (25.0, 36.0)
    assert abs(cell["apiq-bw"]["mean_activation_error"] - 0.305) < 1e-12
    assert sweep.figures(s0, "m", [2], [8])["started_beats_plain"] == 0
    assert sweep.figures(s0 + s1, "m", [2], [8])["started_beats_plain"] == 1
    text = sweep.table(s0 + s1, "m", [2], [8])
    assert "lowest-highest over seeds [0, 1]" in text and "| 25.00-36.00 |" in text
    assert "lowest-highest" not in sweep.table(s0, "m", [2], [8])


def test_a_cell_counts_only_when_its_variants_have_the_same_seeds():
    s0 = _seeded({**BASE, "apiq-lw": (35.0, 25.0), "apiq-bw": (25.0, 17.0), "apiq-bw+loftq": (26.0, 17.5),
                  "apiq-bw+cloq": (27.0, 18.0)}, 0)
    half = _seeded({"apiq-bw": (36.0, 19.0)}, 1)  # seed 1 under way: only one variant done
    assert sweep.figures(s0 + half, "m", [2], [8])["cells"] == 0
    assert sweep.figures(s0, "m", [2], [8])["cells"] == 1


def test_rows_written_before_seeds_keep_theirs_in_the_settings():
    assert sweep.row_seed({"settings": {"seed": 2}}) == 2
    assert sweep.row_seed({"seed": 1, "settings": {}}) == 1
    assert sweep.row_seed({}) == 0


def test_bad_seeds_are_refused_in_one_line(monkeypatch, tmp_path):
    import pytest

    for bad in ("x", "-1", ","):
        monkeypatch.setattr("sys.argv", ["sweep.py", "--seeds", bad, "--report-only", "--out", str(tmp_path)])
        with pytest.raises(SystemExit, match="--seeds: .* is not a comma-separated list of integers >= 0"):
            sweep.main()


def test_stories_seeds_draw_disjoint_blocks_of_calibration_rows(shared):
    import argparse

    import pytest

    root = shared("data", "tinystories260K", "calib.npy").parents[2]
    args = argparse.Namespace(shared=str(root), nsamples=16, seqlen=32, eval_windows=2)
    rows = np.load(root / "data" / "tinystories260K" / "calib.npy")
    for seed in (0, 2):
        calib = sweep.load_model("stories260K", args, seed)["calib"]
        np.testing.assert_array_equal(calib, rows[16 * seed: 16 * seed + 16, :32])
    top = len(rows) // 16
    with pytest.raises(SystemExit, match=f"accepted seeds: 0..{top - 1}"):
        sweep.load_model("stories260K", args, top)


def test_heat_map_colours_each_variant_by_its_place_in_the_row(tmp_path):

    nan = float("nan")
    places = sweep.row_places([[3.0, 1.0, nan, 2.0], [5.0, 5.0, 4.0, nan]])
    np.testing.assert_array_equal(places, [[3.0, 1.0, nan, 2.0], [2.0, 3.0, 1.0, nan]])
    png = sweep.heatmap(_rows({**BASE, "apiq-bw": (29.0, 19.0)}), "m", [2], [8], tmp_path / "m.png", 20.0)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_perplexities_match_the_evaluator_at_one():
    """At temperature 1 the yardstick is the model's own perplexity (apiq_jax.evaluate, independently
    batched); sharpening or flattening the logits moves it."""
    from apiq_jax.compare import full_precision_row
    from apiq_jax.demo_data import DEMO_MODEL_DIR
    from apiq_jax.models import load_pretrained

    model = load_pretrained(DEMO_MODEL_DIR)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 32)).astype(np.int32)
    temps = sweep.temperature_perplexities(model.params, model.config, ids, (0.5, 1.0, 2.0))
    ref = full_precision_row(model.params, model.config, ids)["perplexity"]
    assert abs(temps[1.0] - ref) / ref < 1e-5
    assert temps[0.5] != temps[1.0] != temps[2.0]
