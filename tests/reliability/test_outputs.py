"""``--out`` safety: overlap with ``--model``, finished and foreign outputs, locks, a full disk, unfinished outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from apiq_jax.commands.outputs import COMPLETE, LOCK_FILE, RUN_FILE, RUNNING, read_marker
from tests.reliability.conftest import (
    assert_user_error,
    child_env,
    finetune_args,
    quantize_args,
    run_cli,
    snapshot,
)


def test_out_equal_to_model_is_refused_up_front(capsys, hf_copy, files):
    before = snapshot(hf_copy)
    code, _, err = run_cli(capsys, *quantize_args(hf_copy, hf_copy, files["calib"]))
    assert_user_error(code, err, "is the --model directory; give a new directory", "quantize")
    assert snapshot(hf_copy) == before  # config.json not overwritten, nothing added


def test_out_inside_model_is_refused(capsys, hf_copy, files):
    before = snapshot(hf_copy)
    code, _, err = run_cli(capsys, *quantize_args(hf_copy, hf_copy / "quantized", files["calib"]))
    assert_user_error(code, err, "is inside the --model directory", "quantize")
    assert snapshot(hf_copy) == before and not (hf_copy / "quantized").exists()


def test_out_holding_model_is_refused(capsys, tiny_q, tmp_path, files):
    """finetune --out PARENT of --model: --overwrite there could replace the model's files."""
    parent = tmp_path / "p"
    shutil.copytree(tiny_q, parent / "q")
    before = snapshot(parent)
    code, _, err = run_cli(capsys, *finetune_args(parent / "q", parent, files["calib"]))
    assert_user_error(code, err, "holds the --model directory", "finetune")
    assert snapshot(parent) == before


def test_out_is_a_file(capsys, tiny_hf, tmp_path, files):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, tmp_path / "f", files["calib"]))
    assert_user_error(code, err, "exists and is not a directory", "quantize")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_not_writable(capsys, tiny_hf, tmp_path, files):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *quantize_args(tiny_hf, ro / "out", files["calib"]))
    finally:
        ro.chmod(0o755)
    assert_user_error(code, err, "is not writable", "quantize")
    assert not (ro / "out").exists()


def test_finished_output_is_refused_without_overwrite(capsys, tiny_hf, tmp_path, files):
    out = tmp_path / "out"
    assert run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"]))[0] == 0
    assert read_marker(out)["state"] == COMPLETE and not (out / LOCK_FILE).exists()
    before = snapshot(out)
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", "--bits", "3"))
    assert_user_error(code, err, "already holds a finished model of `apiq-jax quantize` (made with other "
                                 "arguments: --bits 3 (the run in --out used 2)); pass --overwrite", "quantize")
    assert snapshot(out) == before  # nothing replaced
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", "--bits", "3", "--overwrite"))
    assert code == 0, err
    assert read_marker(out)["args"]["bits"] == 3 and read_marker(out)["state"] == COMPLETE


def test_output_of_another_command_is_refused(capsys, tiny_hf, tiny_q, tmp_path, files):
    ft = tmp_path / "ft"
    assert run_cli(capsys, *finetune_args(tiny_q, ft, files["calib"]))[0] == 0
    before = snapshot(ft)
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, ft, files["calib"]))
    assert_user_error(code, err, "holds the output of `apiq-jax finetune`", "quantize")
    assert snapshot(ft) == before


def test_finished_finetune_rerun_with_the_same_arguments_rewrites_the_same_files(capsys, tiny_q, tmp_path, files):
    """Its final checkpoint is kept: the identical command trains no step and writes identical files."""
    out = tmp_path / "ft"
    argv = finetune_args(tiny_q, out, files["calib"])
    assert run_cli(capsys, *argv)[0] == 0
    before = {k: v for k, v in snapshot(out).items() if not k.endswith(".png")}
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "resuming from step 2/2" in err
    assert {k: v for k, v in snapshot(out).items() if not k.endswith(".png")} == before
    code, _, err = run_cli(capsys, *argv[:-1], "--steps", "3", "--quiet")
    assert_user_error(code, err, "--steps 3 (the run in --out used 2)", "finetune")


def test_non_empty_unrelated_directory_is_refused(capsys, tiny_hf, tmp_path, files):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"]))
    assert_user_error(code, err, "is a non-empty directory that is not an apiq-jax output", "quantize")
    assert snapshot(out) == {"notes.txt": snapshot(out)["notes.txt"]} and len(snapshot(out)) == 1
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "my thesis"  # written into, nothing of the user's removed


def test_empty_existing_directory_is_accepted(capsys, tiny_hf, tmp_path, files):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"]))
    assert code == 0, err


def test_eval_and_finetune_on_an_unfinished_output_say_so(capsys, tiny_q, tmp_path, files):
    """A run killed before its last write leaves the running marker: never something that looks finished."""
    out = tmp_path / "killed"
    shutil.copytree(tiny_q, out)
    marker = read_marker(out)
    (out / RUN_FILE).write_text(__import__("json").dumps({**marker, "state": RUNNING}))
    code, _, err = run_cli(capsys, "eval", "--model", out, "--data", files["calib"], "--quiet")
    assert_user_error(code, err, f"--model {out} is the unfinished output of `apiq-jax quantize` (interrupted, or "
                                 "still running); re-run that command to finish it", "eval")
    code, _, err = run_cli(capsys, *finetune_args(out, tmp_path / "ft", files["calib"]))
    assert_user_error(code, err, "is the unfinished output of `apiq-jax quantize`", "finetune")
    assert not (tmp_path / "ft").exists()


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_second_process_on_the_same_out_fails_at_once_and_a_killed_holder_leaves_nothing_stuck(
        capsys, tiny_hf, tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"]))
        assert time.perf_counter() - t < 10  # at once, not after the other run
        assert_user_error(code, err, f"is in use by another apiq-jax process (pid {holder.pid}", "quantize")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.wait()
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"]))
    assert code == 0, err


_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from apiq_jax.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_while_saving_says_so_and_keeps_the_previous_output(capsys, tiny_hf, tmp_path, files):
    """RLIMIT_FSIZE of 64 KiB: the 600 KB frozen file cannot be written (EFBIG, as ENOSPC on a full disk)."""
    out = tmp_path / "out"
    assert run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", "--bits", "4"))[0] == 0
    before = {k: v for k, v in snapshot(out).items() if k != RUN_FILE}
    argv = [str(a) for a in quantize_args(tiny_hf, out, files["calib"], "rtn", "--overwrite")]
    r = subprocess.run([sys.executable, "-c", _LIMITED, str(64 * 1024), *argv], capture_output=True, text=True,
                       timeout=300, env=child_env({"PYTHONDONTWRITEBYTECODE": "1"}))
    assert_user_error(r.returncode, r.stderr, "(disk full or file size limit); free space and re-run the same "
                                              "command", "quantize")
    assert "frozen.safetensors failed" in r.stderr
    after = {k: v for k, v in snapshot(out).items() if k != RUN_FILE}
    assert after == before  # every file of the previous model intact, no temporary file left
    assert read_marker(out)["state"] == RUNNING  # and it is not taken for the new run's result
    code, _, err = run_cli(capsys, *argv[:-1])  # space freed: the same command (without --overwrite) finishes it
    assert code == 0, err
    assert read_marker(out)["state"] == COMPLETE


def test_a_user_error_leaves_an_existing_directory_as_it_was(capsys, tiny_q, tmp_path):
    """The data is found short only once --out is claimed (finetune reads it into OUT/data_cache): all undone."""
    import numpy as np

    out = tmp_path / "empty"
    out.mkdir()
    np.save(tmp_path / "short.npy", np.arange(10, dtype=np.int32))
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, tmp_path / "short.npy", "--seqlen", "16"))
    assert_user_error(code, err, "only 10 tokens, fewer than one window of seqlen 16", "finetune")
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_export_and_import_claim_out_as_quantize_does(capsys, tiny_q, tmp_path, files):
    """The interop commands' --out: refused when finished, foreign or overlapping; an unfinished import is refused."""
    g = tmp_path / "g"
    export = ["export", "--model", tiny_q, "--format", "gptq", "--out", g]
    assert run_cli(capsys, *export)[0] == 0
    assert read_marker(g)["command"] == "export" and read_marker(g)["state"] == COMPLETE
    before = snapshot(g)
    code, _, err = run_cli(capsys, *export)
    assert_user_error(code, err, f"--out {g} already holds a finished model of `apiq-jax export`; pass --overwrite",
                      "export")
    assert snapshot(g) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    code, _, err = run_cli(capsys, "import", "--from", "gptq", g, "--out", mine)
    assert_user_error(code, err, f"--out {mine} is a non-empty directory that is not an apiq-jax output", "import")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    code, _, err = run_cli(capsys, "import", "--from", "gptq", g, "--out", g)
    assert_user_error(code, err, f"--out {g} is the SRC directory", "import")
    assert snapshot(g) == before
    q = tmp_path / "q"
    assert run_cli(capsys, "import", "--from", "gptq", g, "--out", q)[0] == 0
    (q / RUN_FILE).write_text(__import__("json").dumps({**read_marker(q), "state": RUNNING}))  # as if killed
    code, _, err = run_cli(capsys, "eval", "--model", q, "--data", files["calib"], "--quiet")
    assert_user_error(code, err, f"--model {q} is the unfinished output of `apiq-jax import`", "eval")
