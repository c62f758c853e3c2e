"""apiq_jax/demo_data.py and the bundled demo model: files, transformers parity, held-out text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apiq_jax.demo_data import CALIB_MODULES, DEMO_MODEL_DIR, EVAL_MODULES, demo_text, training_modules
from tests.conftest import require_module


def test_bundled_model_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 8 * 2**20
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["intermediate_size"] % 64 != 0  # exercises the padded last group


def test_bundled_model_loads_in_transformers_and_matches_jax():
    torch = require_module("torch")
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
