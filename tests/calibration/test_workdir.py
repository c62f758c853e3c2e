"""The resumable work directory (apiq_jax/calibration/workdir.py): a real SIGKILL and re-run gives a
bit-identical result, stale states are redone, a different run is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import CalibrationReport
from apiq_jax.calibration.reports import BlockReport
from apiq_jax.calibration.workdir import WorkDir
from apiq_jax.lora import LINEARS
from apiq_jax.models.safetensors_io import write_safetensors
from apiq_jax.quant import ClipLogits
from tests.calibration import resume_worker as W

REPO = Path(__file__).resolve().parents[2]


def assert_same_result(a, b):
    for la, lb in zip(a.params["layers"], b.params["layers"]):
        for n in LINEARS:
            np.testing.assert_array_equal(np.asarray(la[n].codes), np.asarray(lb[n].codes))
            np.testing.assert_array_equal(np.asarray(la[n].scales), np.asarray(lb[n].scales))
            np.testing.assert_array_equal(np.asarray(la[n].zeros), np.asarray(lb[n].zeros))
    for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.extras["clip"]), jax.tree.leaves(b.extras["clip"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for ra, rb in zip(a.report.blocks, b.report.blocks):
        assert ra.loss_curve == rb.loss_curve
        assert ra.error_after == rb.error_after


@pytest.fixture(scope="module")
def uninterrupted():
    return W.run(None)


def _kill_after_block_0(work: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.calibration.resume_worker", str(work), "--pause-after-block", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 240
        # wait for block 0's finished checkpoint (the streams checkpoint marks a block as done)
        while not (work / "streams" / "0").is_dir():
            assert proc.poll() is None, f"worker exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "block 0 checkpoint did not appear"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_and_resume_equals_uninterrupted(tmp_path, uninterrupted):
    work = tmp_path / "work"
    _kill_after_block_0(work)
    assert not (work / "streams" / "1").exists()

    resumed = W.run(work)
    assert resumed.report.extra["resumed_from_block"] == 1
    assert_same_result(resumed, uninterrupted)
    # the block 0 report came from the killed process
    assert resumed.report.blocks[0].loss_curve == uninterrupted.report.blocks[0].loss_curve

    # report files
    rep = CalibrationReport.from_dict(json.loads((work / "report.json").read_text()))
    assert rep.method == "apiq-bw" and len(rep.blocks) == W.CFG.num_hidden_layers
    assert (work / "report.png").stat().st_size > 0

    # a finished work dir returns the same result without training
    again = W.run(work)
    assert again.report.extra["resumed_from_block"] == W.CFG.num_hidden_layers
    assert_same_result(again, uninterrupted)

    # a different call on the same work dir is refused, naming what differs
    with pytest.raises(ValueError, match="options"):
        W.run(work, lora_lr=1e-3)


def test_a_run_with_a_work_dir_equals_one_in_memory(tmp_path, uninterrupted, monkeypatch):
    """Finished blocks' LoRA and clip logits are dropped from memory and read back at the end."""
    import apiq_jax.calibration.apiq as apiq

    kept = []
    real = apiq.run_blocks
    monkeypatch.setattr(apiq, "run_blocks", lambda *a, **k: kept.extend(real(*a, **k)) or list(kept))
    res = W.run(tmp_path / "work")
    assert len(kept) == W.CFG.num_hidden_layers and all(o.lora is None and o.state is None for o in kept)
    assert_same_result(res, uninterrupted)


def test_a_lazy_result_stays_on_disk_until_saved(tmp_path, uninterrupted):
    """lazy_result: LoRA and clip logits are LazyTensors of the work dir; saved, they equal the in-memory run."""
    from apiq_jax.models import load_quantized, save_quantized
    from apiq_jax.models.hf_io import LazyTensor, materialize

    res = W.run(tmp_path / "work", lazy_result=True)
    leaves = jax.tree.leaves(res.lora.factors) + jax.tree.leaves(res.extras["clip"])
    assert leaves and all(isinstance(x, LazyTensor) for x in leaves)
    res = dataclasses.replace(res, extras=materialize(res.extras))
    out = save_quantized(tmp_path / "q", res.params, res.lora, W.CFG)
    _, lora, _, _ = load_quantized(out)
    assert_same_result(dataclasses.replace(res, lora=lora), uninterrupted)


def test_stale_block_state_is_replaced(tmp_path, uninterrupted):
    """A crash between saving a block's state and its streams: the block is redone."""
    work = tmp_path / "work"
    W.run(work)
    last = W.CFG.num_hidden_layers - 1
    shutil.rmtree(work / "streams" / str(last))  # as if killed before the streams were written
    resumed = W.run(work)
    assert resumed.report.extra["resumed_from_block"] == 0  # only the newest streams are kept
    assert_same_result(resumed, uninterrupted)


def _state(value: float) -> dict:
    return {"clip": {"q_proj": ClipLogits(jnp.full((2, 3), value), jnp.full((2, 3), -value))},
            "lora": {"a": jnp.full((4,), value)}}


def test_save_restore_and_stale_states(tmp_path):
    fingerprint = {"method": "x", "options": {"epochs": 1}}
    wd = WorkDir(tmp_path, fingerprint)
    assert wd.next_block() == 0 and wd.reports() == {}
    wd.save(0, _state(1.0), {"x": jnp.ones(2)}, BlockReport(0, error_after=0.5))
    write_safetensors(tmp_path / "finished" / "1.safetensors", {"['lora']['a']": np.full(4, 2.0, np.float32)})
    # ^ block 1's state, killed before its streams
    wd.close()

    wd = WorkDir(tmp_path, fingerprint)
    assert wd.next_block() == 1
    assert not (tmp_path / "finished" / "1.safetensors").exists()  # the stale state was dropped
    restored = wd.restore_state(0, _state(0.0))
    assert isinstance(restored["clip"]["q_proj"], ClipLogits)
    np.testing.assert_array_equal(np.asarray(restored["clip"]["q_proj"].beta), -1.0)
    np.testing.assert_array_equal(np.asarray(wd.restore_streams(0, {"x": jnp.zeros(2)})["x"]), 1.0)
    assert wd.reports()[0].error_after == 0.5
    wd.save(1, _state(3.0), {"x": jnp.full(2, 3.0)}, BlockReport(1))  # redone
    np.testing.assert_array_equal(np.asarray(wd.restore_state(1, _state(0.0))["lora"]["a"]), 3.0)
    wd.close()
    with pytest.raises(ValueError, match=r"differs in: options\)"):
        WorkDir(tmp_path, {"method": "x", "options": {"epochs": 2}})


def test_block_state_is_stored_once_and_a_damaged_one_says_how_to_discard_it(tmp_path):
    """One store per finished block (finished/<i>.safetensors, no orbax copy); a truncated file is refused."""
    wd = WorkDir(tmp_path, {"method": "x"})
    wd.save(0, _state(1.0), {"x": jnp.ones(2)}, BlockReport(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_reports.json", "fingerprint.json", "finished",
                                                          "streams"]
    assert [p.name for p in (tmp_path / "finished").iterdir()] == ["0.safetensors"]
    f = tmp_path / "finished" / "0.safetensors"
    good = f.read_bytes()
    message = r"block 0's state .*0.safetensors of the work directory is missing or corrupt \(.*\); delete .* to " \
              r"discard it \(or pass --overwrite\)"
    for damaged in (good[:-8], good[:-8] + b"\xff" * 8):  # the last tensor's data cut short / turned into NaNs
        f.write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            wd.restore_state(0, _state(0.0))
    wd.close()
