"""The offline demo: bundled model loads in transformers, ``apiq-jax demo --fast`` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from apiq_jax.demo_data import CALIB_MODULES, DEMO_MODEL_DIR, EVAL_MODULES, demo_text, training_modules
from tests.conftest import REPO_ROOT


def test_bundled_model_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 8 * 2**20
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["intermediate_size"] % 64 != 0  # exercises the padded last group


def test_bundled_model_loads_in_transformers_and_matches_jax():
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from apiq_jax.models import load_pretrained

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR), local_files_only=True)
    hf = LlamaForCausalLM.from_pretrained(str(DEMO_MODEL_DIR), local_files_only=True).eval()
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "def add(a, b):\n    return a + b\n"
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    ours = np.asarray(load_pretrained(DEMO_MODEL_DIR)(ids.numpy()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    # it learned Python: predicting the next token beats a uniform guess by far
    logp = torch.log_softmax(torch.from_numpy(ref[0, :-1]), -1)
    nll = -logp.gather(-1, ids[0, 1:, None]).mean().item()
    assert nll < 0.6 * np.log(hf.config.vocab_size)


def test_heldout_modules_are_not_training_data():
    train = set(training_modules())
    assert not train & set(CALIB_MODULES + EVAL_MODULES)
    assert len(demo_text("calib")) > 10_000 and len(demo_text("eval")) > 10_000
    with pytest.raises(ValueError, match="kind"):
        demo_text("train")


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


def test_demo_rejects_unknown_method(tmp_path, capsys):
    from apiq_jax.cli import main

    assert main(["demo", "--fast", "--methods", "rtn,awq", "--out", str(tmp_path)]) != 0
    assert "awq" in capsys.readouterr().err
