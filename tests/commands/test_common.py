"""Shared command helpers: defaults read from their one source, user errors, backend choice, token data."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from apiq_jax.commands import common
from apiq_jax.training import FinetuneConfig


def test_field_default_reads_the_dataclass():
    assert common.field_default(FinetuneConfig, "steps") == FinetuneConfig().steps
    assert common.field_default(FinetuneConfig, "learning_rate") == FinetuneConfig().learning_rate
    with pytest.raises(KeyError, match="no field 'nope'"):
        common.field_default(FinetuneConfig, "nope")


def test_run_command_turns_user_errors_into_one_line(capsys):
    def bad(args):
        raise ValueError("--bits 5 is not supported; accepted: 2, 3, 4")

    code = common.run_command(argparse.Namespace(command="quantize", func=bad))
    err = capsys.readouterr().err
    assert code == common.USER_ERROR_EXIT == 2
    assert err == "apiq-jax quantize: error: --bits 5 is not supported; accepted: 2, 3, 4\n"
    assert common.run_command(argparse.Namespace(command="eval", func=lambda a: None)) == 0

    def crash(args):
        raise RuntimeError("a bug, not a user error")

    with pytest.raises(RuntimeError):  # programming errors keep their traceback
        common.run_command(argparse.Namespace(command="eval", func=crash))


def test_print_json_is_one_line(capsys):
    common.print_json({"perplexity": 3.5, "out": "runs/x"})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == {"perplexity": 3.5, "out": "runs/x"}


def test_compute_backend_resolves_and_prepares(monkeypatch):
    from apiq_jax.qmatmul import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    name, prepare = common.compute_backend("xla")
    tree = {"w": np.ones(3)}
    assert name == "xla" and prepare(tree) is tree  # no kernel layout off the kernels
    monkeypatch.setenv(ENV_VAR, "interpret")
    assert common.compute_backend(None)[0] == "interpret"  # the environment picks the default
    with pytest.raises(ValueError, match="accepted"):
        common.compute_backend("cuda")


def test_load_token_data_windows_and_checks(tmp_path):
    stream = tmp_path / "ids.npy"
    np.save(stream, np.arange(10, dtype=np.int64))
    got = common.load_token_data(stream, "--data", model_dir=tmp_path, seqlen=4, max_len=16, vocab_size=32)
    assert got.dtype == np.int32 and got.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(12, dtype=np.int32).reshape(3, 4))
    assert common.load_token_data(rows, "--eval", model_dir=tmp_path, seqlen=None, max_len=16,
                                  vocab_size=32).shape == (3, 4)
    with pytest.raises(ValueError, match="--seqlen 3 differs from the row length 4"):
        common.load_token_data(rows, "--eval", model_dir=tmp_path, seqlen=3, max_len=16, vocab_size=32)
    with pytest.raises(ValueError, match=r"--data .*ids.npy: token id 8 at position 8 .*0 <= id < 8"):
        common.load_token_data(stream, "--data", model_dir=tmp_path, seqlen=4, max_len=16, vocab_size=8)
