"""Library entry points behind the commands: bad input is one clear ValueError naming the value and the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.evaluate import activation_errors
from apiq_jax.models import copy_tokenizer_files, load_pretrained, load_quantized


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_activation_errors_batch_size(tiny_hf, bad):
    model = load_pretrained(tiny_hf)
    ids = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match=rf"batch_size={bad!r} must be a positive int"):
        activation_errors(model, model, ids, batch_size=bad)


def test_bad_config_of_a_quantized_model_names_its_config_json(tiny_q, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(tiny_q, q)
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=rf"^{q / 'config.json'}: architecture \['GPT2LMHeadModel'\]"):
        load_quantized(q)


def test_copy_tokenizer_files_creates_the_destination(tmp_path):
    dst = tmp_path / "a" / "b"
    copied = copy_tokenizer_files(DEMO_MODEL_DIR, dst)
    assert "tokenizer.json" in copied
    assert (dst / "tokenizer.json").read_bytes() == (DEMO_MODEL_DIR / "tokenizer.json").read_bytes()
