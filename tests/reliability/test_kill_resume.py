"""SIGKILL at seeded random moments: a rerun of the same command ends bit-identical to an uninterrupted run.

Three chains, one per phase: ``quantize --method apiq-bw`` (killed while it calibrates),
``finetune`` (while it trains) and the final save of ``quantize`` (killed right before a
seeded choice of its file renames, i.e. between any two steps of the save). In a chain the
same command is killed again and again, each run resuming the previous one's state, and
the last run finishes. After every kill the output must not look finished. The finished
tensors (every ``.safetensors`` byte), config and quantization metadata must equal those
of an uninterrupted run of the same command.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apiq_jax.cli import main
from apiq_jax.commands.outputs import COMPLETE, check_finished, read_marker
from tests.reliability.conftest import REPO, child_env, finetune_args, quantize_args

pytestmark = pytest.mark.slow
KILLS = 5

_KILL_BEFORE_REPLACE = """
import os, signal, sys
n = int(sys.argv[1])
calls = [0]
real = os.replace
def replace(*a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
os.replace = replace
from apiq_jax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def result_files(out: Path) -> dict[str, bytes]:
    """What must be bit-identical: every tensor file and config byte, the quantization metadata."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"}
    meta = json.loads((out / "apiq_meta.json").read_text())
    files["apiq_meta.json"] = json.dumps({k: meta[k] for k in ("quantized", "lora_config", "architecture")},
                                         sort_keys=True).encode()
    return files


def _argv(args) -> list[str]:
    return [sys.executable, "-m", "apiq_jax.cli", *map(str, args)]


def _kill_after(args, out: Path, delay: float) -> int:
    """Run ``args``, SIGKILL it ``delay`` s after it claimed ``out``; its exit status (-9 when killed)."""
    proc = subprocess.Popen(_argv(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=REPO)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        marker = read_marker(out)
        if marker is not None and marker.get("state") != COMPLETE:
            break
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    return proc.returncode


def _assert_unfinished(out: Path) -> None:
    marker = read_marker(out)
    if marker is None:  # killed before its running marker landed: nothing but the lock and a temporary file
        assert {p.name for p in out.iterdir()} <= {".apiq-jax.lock", ".apiq-jax-run.json.tmp"}
        return
    assert marker["state"] != COMPLETE
    with pytest.raises(ValueError, match="unfinished output"):
        check_finished(out)


def _chain(args, out: Path, seed: int, max_delay: float) -> int:
    """Kill the command at seeded random delays until KILLS kills landed; then let it finish. Kills landed."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(3 * KILLS):
        if landed == KILLS:
            break
        code = _kill_after(args, out, rng.uniform(0.0, max_delay))
        marker = read_marker(out)
        if code == -signal.SIGKILL and (marker is None or marker["state"] != COMPLETE):
            landed += 1
            _assert_unfinished(out)
        else:  # it finished before the kill, or was killed while exiting after its last write (the complete
            # marker): a finished output; start over for the next moment
            assert code in (0, -signal.SIGKILL) and marker["state"] == COMPLETE
            check_finished(out)
            args = [*args, "--overwrite"] if "--overwrite" not in args else args
    assert main([str(a) for a in args if a != "--overwrite"]) == 0  # the last rerun, in process
    return landed


def test_sigkill_while_calibrating_apiq_bw(tiny_hf, files, tmp_path):
    extra = ("--epochs", "3", "--nsamples", "2", "--seqlen", "16")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([str(a) for a in quantize_args(tiny_hf, ref, files["stream"], "apiq-bw", *extra)]) == 0
    landed = _chain(quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *extra), out, seed=14, max_delay=6.0)
    assert landed == KILLS
    assert result_files(out) == result_files(ref)


def test_sigkill_while_finetuning(tiny_q, files, tmp_path):
    extra = ("--steps", "12", "--save-every", "1")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([str(a) for a in finetune_args(tiny_q, ref, files["calib"], *extra)]) == 0
    landed = _chain(finetune_args(tiny_q, out, files["calib"], *extra), out, seed=15, max_delay=6.0)
    assert landed == KILLS
    assert result_files(out) == result_files(ref)


def test_sigkill_during_the_final_save(tiny_hf, files, tmp_path):
    """Killed before the n-th file rename of the run (seeded n), again and again; the last run finishes."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = quantize_args(tiny_hf, out, files["calib"], "rtn")
    assert main([str(a) for a in quantize_args(tiny_hf, ref, files["calib"], "rtn")]) == 0
    # the renames of a run: the running marker, the staged frozen/lora/config/meta files, report.json, the
    # complete marker (at least 6); the points are drawn among the first 6, the last being the complete marker
    points = random.Random(16).sample(range(1, 7), KILLS)
    for n in points:
        proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_REPLACE, str(n), *map(str, args)],
                              env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, (n, proc.stderr)
        _assert_unfinished(out)
    assert main([str(a) for a in args]) == 0
    assert read_marker(out)["state"] == COMPLETE and not list(out.glob(".*.tmp"))
    assert result_files(out) == result_files(ref)
