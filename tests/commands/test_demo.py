"""``apiq-jax demo`` (apiq_jax/commands/demo.py): ``--fast`` end to end, offline; errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from apiq_jax.cli import main
from apiq_jax.commands import demo as demo_cmd
from tests.conftest import REPO_ROOT


def test_demo_fast_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "apiq_jax.cli", "demo", "--fast", "--quiet", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    for label in ("full precision", "RTN", "QLoRA (NF)", "LoftQ", "ApiQ-lw", "ApiQ-bw"):
        assert f"| {label}" in stdout, stdout
    assert "| method | bits/param | perplexity | mean act. error |" in stdout
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "rtn", "qlora", "loftq", "apiq-lw", "apiq-bw"}
    assert all(np.isfinite(r["perplexity"]) for r in rows.values())
    assert all(r["mean_activation_error"] > 0 for m, r in rows.items() if m != "fp32")
    assert 2.0 < rows["rtn"]["bits_per_param"] < 3.0
    assert (out / "demo.png").stat().st_size > 10_000
    # the short LoRA finetuning stage ran for every quantized model
    assert "perplexity after finetuning |" in stdout
    for m, r in rows.items():
        if m != "fp32":
            assert len(r["finetune_losses"]) == 2 and np.isfinite(r["perplexity_finetuned"])
    # the last stdout line is one JSON object (as for every command), agreeing with results.json
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["results"] == str(out / "results.json") and last["plot"] == str(out / "demo.png")
    assert [r["method"] for r in last["rows"]] == [r["method"] for r in res["rows"]]
    for mine, full in zip(last["rows"], res["rows"]):
        assert mine["perplexity"] == full["perplexity"]
        assert mine.get("perplexity_finetuned") == full.get("perplexity_finetuned")
        assert "activation_errors" not in mine and "finetune_losses" not in mine
    assert last["fast"] is True and last["calib_shape"] == res["calib_shape"]
    # the table still comes before it, with the LoftQ iteration count the help names
    assert f"LoftQ (NF, {demo_cmd.DEMO_LOFTQ_ITERATIONS} it.)" in stdout


def test_demo_rejects_unknown_method(tmp_path, capsys):
    assert main(["demo", "--fast", "--methods", "rtn,awq", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "awq" in err and err.startswith("apiq-jax demo: error: ")


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--fast", "--nsamples", "0", "--out", str(tmp_path)]) == 2
    assert "--nsamples 0 must be a positive integer" in capsys.readouterr().err


def test_summary_line_drops_the_long_lists():
    summary = {"bits": 2, "rows": [{"method": "rtn", "label": "RTN", "perplexity": 3.0, "activation_errors": [1.0],
                                    "finetune_losses": [2.0], "perplexity_finetuned": 2.5}]}
    line = demo_cmd.summary_line(summary, "r.json", None)
    assert line == {"bits": 2, "rows": [{"method": "rtn", "label": "RTN", "perplexity": 3.0,
                                         "perplexity_finetuned": 2.5}], "results": "r.json", "plot": None}
    json.dumps(line)
