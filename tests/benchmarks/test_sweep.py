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
