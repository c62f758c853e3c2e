"""Ctrl-C, resuming, resuming with other arguments, corrupt checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from apiq_jax.commands import quantize as qcmd
from apiq_jax.commands.outputs import RUN_FILE, RUNNING, read_marker
from apiq_jax.models import load_quantized
from tests.reliability.conftest import REPO, assert_user_error, child_env, finetune_args, quantize_args, run_cli

BW = ("--epochs", "1", "--nsamples", "2", "--seqlen", "16")


def _interrupt_after_block(monkeypatch, block: int) -> None:
    """Make the next quantize run raise KeyboardInterrupt (as Ctrl-C does) once ``block`` is checkpointed."""
    original = qcmd.method_options

    def stop(i, report):
        if i == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(qcmd, "method_options", lambda *a, **k: {**original(*a, **k), "on_block_end": stop})


def _lora_leaves(path):
    _, lora, *_ = load_quantized(path)
    return [np.asarray(x) for x in jax.tree.leaves(lora)]


@pytest.fixture(scope="module")
def bw_full(tiny_hf, files, tmp_path_factory):
    """An uninterrupted ApiQ-bw run of the tiny model."""
    out = tmp_path_factory.mktemp("bw") / "full"
    from apiq_jax.cli import main

    assert main([str(a) for a in quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *BW)]) == 0
    return out


def test_ctrl_c_in_quantize_says_where_it_resumes_and_the_rerun_does(capsys, monkeypatch, tiny_hf, files, tmp_path,
                                                                     bw_full):
    out = tmp_path / "bw"
    argv = quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *BW)
    _interrupt_after_block(monkeypatch, 0)
    code, _, err = run_cli(capsys, *argv)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == ("apiq-jax quantize: interrupted; re-running the same command resumes "
                                            "from block 2/2 (1 finished)")
    assert "Traceback" not in err and read_marker(out)["state"] == RUNNING
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "apiq-jax quantize: resuming from block 2/2 (1 finished" in err
    for a, b in zip(_lora_leaves(bw_full), _lora_leaves(out)):
        np.testing.assert_array_equal(a, b)  # bit-identical to the uninterrupted run


def test_offloaded_run_interrupted_resumes_in_device_memory(capsys, monkeypatch, tiny_hf, files, tmp_path, bw_full):
    """--offload-activations only moves the caches: its host streams resume a run without it, same model."""
    out = tmp_path / "bw"
    argv = quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *BW)
    _interrupt_after_block(monkeypatch, 0)
    assert run_cli(capsys, *argv, "--offload-activations")[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "apiq-jax quantize: resuming from block 2/2 (1 finished" in err
    for a, b in zip(_lora_leaves(bw_full), _lora_leaves(out)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 rounding of one step per batch


def test_resume_with_other_arguments_names_the_flag(capsys, monkeypatch, tiny_hf, files, tmp_path):
    out = tmp_path / "bw"
    argv = quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *BW)
    _interrupt_after_block(monkeypatch, 0)
    assert run_cli(capsys, *argv)[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *argv[:-len(BW)], "--epochs", "2", *BW[2:])
    assert_user_error(code, err, "holds an interrupted run with other arguments: --epochs 2 (the run in --out used 1); "
                                 "re-run with the same arguments to resume it, or pass --overwrite", "quantize")
    assert "options" not in err and "work_dir" not in err  # flags, not internal names
    code, _, err = run_cli(capsys, *argv, "--seed", "1")
    assert_user_error(code, err, "--seed 1 (the run in --out used 0)", "quantize")


def test_corrupt_work_directory_checkpoint_says_how_to_discard_it(capsys, monkeypatch, tiny_hf, files, tmp_path):
    out = tmp_path / "bw"
    argv = quantize_args(tiny_hf, out, files["stream"], "apiq-bw", *BW)
    _interrupt_after_block(monkeypatch, 0)
    assert run_cli(capsys, *argv)[0] == 130
    monkeypatch.undo()
    stream_files = sorted((p for p in (out / qcmd.WORK_SUBDIR / "streams" / "0").rglob("*") if p.is_file()),
                          key=lambda p: -p.stat().st_size)
    stream_files[0].write_bytes(b"\0" * 7)  # the largest file of the checkpoint, damaged
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "of the work directory is corrupt", "quantize")
    assert f"delete {(out / qcmd.WORK_SUBDIR).resolve()} to discard it" in err
    code, _, err = run_cli(capsys, *argv, "--overwrite")  # the way out the message names
    assert code == 0, err


def test_ctrl_c_in_finetune_resumes_from_the_last_checkpoint(capsys, monkeypatch, tiny_q, files, tmp_path):
    from apiq_jax import training

    full, out = tmp_path / "full", tmp_path / "ft"
    extra = ("--steps", "4", "--save-every", "2")
    assert run_cli(capsys, *finetune_args(tiny_q, full, files["calib"]), *extra)[0] == 0
    original = training.Checkpointer.save

    def save_then_interrupt(self, step, tree):
        original(self, step, tree)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Checkpointer, "save", save_then_interrupt)
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, files["calib"]), *extra)
    assert code == 130
    assert err.strip().splitlines()[-1] == ("apiq-jax finetune: interrupted; re-running the same command resumes "
                                            "from step 2/4")
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, files["calib"]), "--steps", "5", "--save-every", "2")
    assert_user_error(code, err, "--steps 5 (the run in --out used 4)", "finetune")
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, files["calib"]), *extra)
    assert code == 0, err
    assert "resuming from step 2/4" in err
    for a, b in zip(_lora_leaves(full), _lora_leaves(out)):
        np.testing.assert_array_equal(a, b)


def test_corrupt_training_checkpoint_says_how_to_discard_it(capsys, tiny_q, files, tmp_path):
    out = tmp_path / "ft"
    argv = finetune_args(tiny_q, out, files["calib"])
    assert run_cli(capsys, *argv)[0] == 0
    marker = read_marker(out)
    (out / RUN_FILE).write_text(json.dumps({**marker, "state": RUNNING}))  # as if killed before the save
    for p in (out / "checkpoints" / "2").rglob("*"):
        if p.is_file() and p.stat().st_size > 64:
            p.write_bytes(b"\0" * 5)
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "cannot be restored (corrupt, or saved by a run with other settings)", "finetune")
    assert f"delete {(out / 'checkpoints').resolve()} to discard it" in err


def test_real_ctrl_c_exits_130_with_one_line(tiny_hf, files, tmp_path):
    """SIGINT to a real process while it calibrates: exit status 130, one line, no traceback."""
    out = tmp_path / "bw"
    argv = [str(a) for a in quantize_args(tiny_hf, out, files["stream"], "apiq-bw", "--epochs", "3", "--nsamples",
                                          "2", "--seqlen", "16")]
    proc = subprocess.Popen([sys.executable, "-m", "apiq_jax.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
    deadline = time.time() + 120
    while not (out / RUN_FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("apiq-jax quantize: interrupted; re-running the same command "), err
    assert "Traceback" not in err
