"""Shared command helpers: defaults read from their one source, user errors, backend choice, token data,
freed host memory returned to the OS."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apiq_jax.commands import common
from apiq_jax.training import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]


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


#: what both malloc scripts start with: glibc's malloc/free through ctypes and the current RSS
_LIBC = """
import ctypes, sys, threading
from apiq_jax.commands.common import return_freed_host_memory, trim_host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
"""

_FRAGMENTED_FREE = _LIBC + """
if sys.argv[1] == "set":
    assert return_freed_host_memory()
p = libc.malloc(16 << 20); ctypes.memset(p, 1, 16 << 20); libc.free(p)  # glibc's default now keeps < 16 MiB
blocks, keep = [], []
def work():  # as XLA's worker threads do: a thread's own malloc arena
    for _ in range(200):  # 2 MiB blocks with small live blocks between them
        b = libc.malloc(2 << 20); ctypes.memset(b, 1, 2 << 20); blocks.append(b); keep.append(libc.malloc(1000))
t = threading.Thread(target=work); t.start(); t.join()
before = rss_mb()
for b in blocks:
    libc.free(b)
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc's mallopt: Linux with glibc only")
def test_freed_blocks_leave_the_rss_once_the_threshold_is_fixed():
    """200 freed 2 MiB blocks of a worker thread: kept by glibc's default, returned after return_freed_host_memory()."""
    def released(mode: str) -> float:
        r = subprocess.run([sys.executable, "-c", _FRAGMENTED_FREE, mode], capture_output=True, text=True,
                           cwd=REPO, check=True)
        return float(r.stdout.strip())

    assert released("set") > 350  # of the 400 MiB freed
    assert released("default") < 50


_FREED_SMALL_BLOCKS = _LIBC + """
assert return_freed_host_memory()
blocks, keep = [], []
def work():  # 512 KiB blocks: under the mmap threshold, so from the worker thread's heap
    for _ in range(400):
        b = libc.malloc(512 << 10); ctypes.memset(b, 1, 512 << 10); blocks.append(b); keep.append(libc.malloc(1000))
t = threading.Thread(target=work); t.start(); t.join()
before = rss_mb()
for b in blocks:
    libc.free(b)
freed = before - rss_mb()
assert trim_host_memory()
print(freed, before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc's malloc_trim: Linux with glibc only")
def test_trim_returns_freed_small_blocks_of_a_thread_arena():
    """200 MiB of freed 512 KiB blocks stay in the arena (under the threshold) until trim_host_memory()."""
    r = subprocess.run([sys.executable, "-c", _FREED_SMALL_BLOCKS], capture_output=True, text=True, cwd=REPO,
                       check=True)
    freed, trimmed = map(float, r.stdout.split())
    assert freed < 20 and trimmed > 150, (freed, trimmed)
