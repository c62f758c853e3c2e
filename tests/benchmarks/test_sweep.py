"""benchmarks/sweep.py: the figures it checks and the table it prints, on hand-made rows (no calibration)."""

from __future__ import annotations

import importlib.util

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
