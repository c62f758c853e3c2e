"""Fixtures of the reliability catalogue: one tiny HF model, one tiny quantized model, helpers.

Every case runs the command as a user would meet it: in process through
``apiq_jax.cli.main`` (the same parser, ``run_command`` and exit code) where that is the
exact user path, and as a subprocess where the process itself matters (exit status after a
signal, Ctrl-C, SIGKILL, file size limits, locks held by another process).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from apiq_jax.cli import main
from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.models import copy_tokenizer_files, save_pretrained
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1024  # the bundled demo tokenizer's vocabulary
MAX_POS = 64


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``apiq-jax argv...`` in process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_sub(*argv: str, timeout: float = 120, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m apiq_jax.cli argv...`` as a child process (CPU, repo on the path)."""
    return subprocess.run([sys.executable, "-m", "apiq_jax.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=child_env(env), cwd=REPO, **kw)


def child_env(extra: dict | None = None) -> dict:
    """The environment of a child ``apiq-jax``: CPU JAX, the repository importable."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return {**env, **(extra or {})}


def assert_user_error(code: int, err: str, fragment: str, command: str) -> None:
    """Exit status 2 and exactly one stderr line ``apiq-jax <command>: error: ...`` holding ``fragment``."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"apiq-jax {command}: error: ")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert fragment in errors[0], (fragment, errors[0])


def snapshot(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` ({} when it does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def quantize_args(model: Path, out: Path, calib: Path, method: str = "rtn", *extra: str) -> list[str]:
    """``apiq-jax quantize`` of the tiny model at 2 bits (``extra`` appended)."""
    return ["quantize", "--model", model, "--method", method, "--bits", "2", "--group-size", "32", "--rank", "4",
            "--alpha", "8", "--calib", calib, "--out", out, "--quiet", *extra]


def finetune_args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    """``apiq-jax finetune`` of a tiny quantized model for 2 steps (``extra`` appended)."""
    return ["finetune", "--model", model, "--data", data, "--out", out, "--steps", "2", "--batch-size", "2",
            "--quiet", *extra]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A random 2-layer Llama in HF format (float32 safetensors) with the demo tokenizer; never modified."""
    d = tmp_path_factory.mktemp("rel_hf") / "model"
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=MAX_POS,
    )
    save_pretrained(init_params(cfg, jax.random.PRNGKey(0)), d, cfg)
    copy_tokenizer_files(DEMO_MODEL_DIR, d)
    return d


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small data files for the tiny model, by stem."""
    d = tmp_path_factory.mktemp("rel_data")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.integers(0, VOCAB, (4, 32)).astype(np.int32))
    np.save(d / "stream.npy", rng.integers(0, VOCAB, 400).astype(np.int64))
    (d / "text.txt").write_text("def f(x):\n    return x + 1\n\n" * 40)
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="session")
def tiny_q(tiny_hf, files, tmp_path_factory) -> Path:
    """``tiny_hf`` quantized with RTN at 2 bits by the CLI; never modified."""
    out = tmp_path_factory.mktemp("rel_q") / "rtn"
    assert main([str(a) for a in quantize_args(tiny_hf, out, files["calib"])]) == 0
    return out


@pytest.fixture
def hf_copy(tiny_hf, tmp_path) -> Path:
    """A private copy of ``tiny_hf`` that a case may damage."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_hf, d)
    return d
