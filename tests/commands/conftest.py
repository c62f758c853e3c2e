"""Fixtures of the command tests: a tiny HF model, small data files, stories260K, helpers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from apiq_jax.cli import main
from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.models import copy_tokenizer_files, save_pretrained
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params
from tests.conftest import require_shared

VOCAB = 1024  # the bundled demo tokenizer's vocabulary, reused for the .txt path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``apiq-jax argv...`` in process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(stdout: str) -> dict:
    """The JSON object on the last stdout line."""
    return json.loads(stdout.strip().splitlines()[-1])


def quantize_args(model: Path, out: Path, calib: Path, method: str, *extra: str) -> list[str]:
    """``apiq-jax quantize`` arguments for the tiny model at 2 bits (``extra`` may override)."""
    return ["quantize", "--model", str(model), "--method", method, "--bits", "2", "--group-size", "32",
            "--rank", "4", "--alpha", "8", "--calib", str(calib), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama in HF format with the demo tokenizer."""
    d = tmp_path_factory.mktemp("tiny_hf")
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128,
    )
    save_pretrained(init_params(cfg, jax.random.PRNGKey(0)), d, cfg)
    copy_tokenizer_files(DEMO_MODEL_DIR, d)
    return d


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small data files for the tiny model, by stem: calib, eval, stream, bad, floats, text."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.integers(0, VOCAB, (3, 32)).astype(np.int32))
    np.save(d / "eval.npy", rng.integers(0, VOCAB, (4, 32)).astype(np.int32))
    np.save(d / "stream.npy", rng.integers(0, VOCAB, 500).astype(np.int64))
    np.save(d / "bad.npy", np.full((2, 16), VOCAB + 5, np.int32))
    np.save(d / "floats.npy", np.zeros((2, 16), np.float32))
    (d / "text.txt").write_text("def f(x):\n    return x + 1\n\n" * 40)
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="session")
def rtn_quantized(tiny_dir, data, tmp_path_factory) -> Path:
    """The tiny model quantized with RTN at 2 bits (uniform grid: the Pallas kernels take it)."""
    out = tmp_path_factory.mktemp("q") / "rtn"
    assert main(quantize_args(tiny_dir, out, data["calib"], "rtn")) == 0
    return out


@pytest.fixture(scope="session")
def qlora_quantized(tiny_dir, data, tmp_path_factory) -> Path:
    """The tiny model quantized with QLoRA at 2 bits (LoRA b = 0)."""
    out = tmp_path_factory.mktemp("q") / "qlora"
    assert main(quantize_args(tiny_dir, out, data["calib"], "qlora")) == 0
    return out


@pytest.fixture(scope="module")
def stories():
    """The stories260K checkpoint from the shared folder (skips without it)."""
    return require_shared("models", "stories260K")
