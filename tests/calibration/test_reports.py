"""Reports (apiq_jax/calibration/reports.py): JSON round trip, the plot, memory statistics."""

from __future__ import annotations

import json

import numpy as np

from apiq_jax.calibration import BlockReport, CalibrationReport
from apiq_jax.calibration.reports import Stopwatch, memory_stats
from apiq_jax.lora import LoraConfig
from apiq_jax.quant import QuantConfig


def _report() -> CalibrationReport:
    blocks = [BlockReport(0, 0.5, 0.1, (1.0, 0.5), 1.5, {"stage": [1, 2]}),
              BlockReport(1, 0.4, 0.2, (0.9, 0.3), 2.0)]
    return CalibrationReport.build("apiq-bw", QuantConfig(2, 64), LoraConfig(rank=4, alpha=8.0), (4, 16),
                                   blocks=blocks, seconds=3.5, options={"epochs": np.int64(2)},
                                   extra={"path": None})


def test_json_round_trip(tmp_path):
    rep = _report()
    path = rep.save_json(tmp_path / "sub" / "report.json")
    back = CalibrationReport.from_dict(json.loads(path.read_text()))
    assert back == rep
    assert back.errors_before == [0.5, 0.4] and back.errors_after == [0.1, 0.2]
    assert back.options == {"epochs": 2} and back.quant_config["bits"] == 2
    assert back.lora_config == {"rank": 4, "alpha": 8.0, "targets": list(LoraConfig(rank=4, alpha=8.0).targets)}
    assert BlockReport.from_dict(rep.blocks[0].to_dict()) == rep.blocks[0]


def test_plot_and_memory(tmp_path):
    png = _report().save_plot(tmp_path / "r.png")
    assert png.stat().st_size > 1000
    mem = memory_stats()
    assert mem["peak_rss_mb"] > 0
    assert Stopwatch().elapsed() >= 0
