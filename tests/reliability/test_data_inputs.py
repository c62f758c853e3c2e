"""Bad data files and sizes: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import pickle  # noqa: S403 - only to WRITE a pickled .npy that the library must refuse to read

import numpy as np
import pytest

from tests.reliability.conftest import MAX_POS, VOCAB, assert_user_error, finetune_args, quantize_args, run_cli

CANARY = []


def _make(tmp_path, kind):
    """A bad data file of ``kind``."""
    p = tmp_path / {"missing": "missing.npy", "empty": "empty.txt", "latin1": "latin1.txt"}.get(kind, f"{kind}.npy")
    if kind == "empty":
        p.write_text("")
    elif kind == "latin1":
        p.write_bytes("café crème brûlée\n".encode("latin-1") * 20)
    elif kind == "floats":
        np.save(p, np.zeros((4, 32), np.float32))
    elif kind == "3d":
        np.save(p, np.zeros((2, 4, 32), np.int32))
    elif kind == "pickled":
        np.save(p, np.array([{"not": "ids"}, 1], dtype=object), allow_pickle=True)
    elif kind == "negative":
        np.save(p, np.full((4, 32), -1, np.int32))
    elif kind == "too_big":
        np.save(p, np.full((4, 32), VOCAB, np.int32))
    elif kind == "short":
        np.save(p, np.arange(10, dtype=np.int32))
    return p


CASES = [
    ("missing", "file not found"),
    ("empty", "the text file is empty"),
    ("latin1", "UTF-8"),
    ("floats", "must be integers"),
    ("3d", "expected [n, seqlen] or 1-D ids, got shape (2, 4, 32)"),
    ("pickled", "pickled object array, which is refused"),
    ("negative", "accepted: 0 <= id < 1024"),
    ("too_big", "accepted: 0 <= id < 1024"),
    ("short", "only 10 tokens, fewer than one window of seqlen 16"),
]


@pytest.mark.parametrize("kind,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_calibration_data(capsys, tiny_hf, tmp_path, kind, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, _make(tmp_path, kind), "rtn", "--seqlen", "16"))
    assert_user_error(code, err, fragment, "quantize")
    assert not out.exists()


def test_pickled_npy_is_never_unpickled(capsys, tiny_hf, tmp_path, monkeypatch):
    """The refusal happens before any object is built: pickle.loads is never called."""
    def trap(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    code, _, err = run_cli(capsys, "eval", "--model", tiny_hf, "--data", _make(tmp_path, "pickled"), "--quiet")
    assert_user_error(code, err, "refused (allow_pickle=False)", "eval")


@pytest.mark.parametrize("kind,fragment", [("floats", "must be integers"), ("negative", "accepted: 0 <= id < 1024"),
                                           ("latin1", "UTF-8")])
def test_bad_finetune_data(capsys, tiny_q, tmp_path, kind, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, _make(tmp_path, kind)))
    assert_user_error(code, err, fragment, "finetune")
    assert not out.exists()


@pytest.mark.parametrize("command", ["quantize", "eval", "finetune"])
def test_seqlen_above_max_position_embeddings(capsys, tiny_hf, tiny_q, files, tmp_path, command):
    out = tmp_path / "out"
    big = str(MAX_POS + 1)
    argv = {"quantize": quantize_args(tiny_hf, out, files["stream"], "rtn", "--seqlen", big),
            "eval": ["eval", "--model", tiny_hf, "--data", files["stream"], "--seqlen", big, "--quiet"],
            "finetune": finetune_args(tiny_q, out, files["stream"], "--seqlen", big)}[command]
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, f"--seqlen {big} exceeds the model's max_position_embeddings {MAX_POS}", command)
    assert not out.exists()


def test_nsamples_more_than_the_rows(capsys, tiny_hf, files, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", "--nsamples", "5"))
    assert_user_error(code, err, "--nsamples 5 exceeds the 4 rows", "quantize")
    assert not out.exists()


def test_nsamples_more_than_a_stream_holds_says_windows_overlap(capsys, tiny_hf, files, tmp_path):
    """400 tokens hold 12 disjoint windows of 32: asking for 20 is legal (random starts) but said."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["stream"], "rtn", "--nsamples", "20",
                                                  "--seqlen", "32"))
    assert code == 0, err
    assert "warning: --nsamples 20 windows of 32 tokens need 640 tokens; --calib" in err
    assert "windows overlap" in err
