"""ApiQ resumability (real SIGKILL + re-run), ApiQ-lw pieces, input validation and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import METHODS, CalibrationReport, apiq_bw, apiq_lw
from apiq_jax.calibration.apiq import LW_STAGES, ApiQOptions, _lw_loss, lw_stage_inputs, train_block_bw
from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.llama import block_forward, linear
from apiq_jax.quant import QuantConfig, fake_quantize, init_clip
from tests.calibration import resume_worker as W

REPO = Path(__file__).resolve().parents[2]


def _assert_same_result(a, b):
    for la, lb in zip(a.params["layers"], b.params["layers"]):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(np.asarray(la[n].codes), np.asarray(lb[n].codes))
            np.testing.assert_array_equal(np.asarray(la[n].scales), np.asarray(lb[n].scales))
            np.testing.assert_array_equal(np.asarray(la[n].zeros), np.asarray(lb[n].zeros))
    for x, y in zip(jax.tree.leaves(a.lora), jax.tree.leaves(b.lora)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for ra, rb in zip(a.report.blocks, b.report.blocks):
        assert ra.loss_curve == rb.loss_curve
        assert ra.error_after == rb.error_after


@pytest.fixture(scope="module")
def uninterrupted():
    return W.run(None)


def test_kill_and_resume_equals_uninterrupted(tmp_path, uninterrupted):
    work = tmp_path / "work"
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
    assert not (work / "streams" / "1").exists()

    resumed = W.run(work)
    assert resumed.report.extra["resumed_from_block"] == 1
    _assert_same_result(resumed, uninterrupted)
    # the block 0 report came from the killed process
    assert resumed.report.blocks[0].loss_curve == uninterrupted.report.blocks[0].loss_curve

    # report files
    rep = CalibrationReport.from_dict(json.loads((work / "report.json").read_text()))
    assert rep.method == "apiq-bw" and len(rep.blocks) == W.CFG.num_hidden_layers
    assert (work / "report.png").stat().st_size > 0

    # a finished work dir returns the same result without training
    again = W.run(work)
    assert again.report.extra["resumed_from_block"] == W.CFG.num_hidden_layers
    _assert_same_result(again, uninterrupted)

    # a different call on the same work dir is refused, naming what differs
    with pytest.raises(ValueError, match="options"):
        W.run(work, lora_lr=1e-3)


def test_stale_block_state_is_replaced(tmp_path, uninterrupted):
    """A crash between saving a block's state and its streams: the block is redone."""
    import shutil

    work = tmp_path / "work"
    W.run(work)
    last = W.CFG.num_hidden_layers - 1
    shutil.rmtree(work / "streams" / str(last))  # as if killed before the streams were written
    resumed = W.run(work)
    assert resumed.report.extra["resumed_from_block"] == 0  # only the newest streams are kept
    _assert_same_result(resumed, uninterrupted)


def test_one_compiled_program_for_all_blocks(uninterrupted):
    # every block of the tiny model has the same shapes: one trace/compile of the whole loop
    assert train_block_bw._cache_size() >= 1
    before = train_block_bw._cache_size()
    W.run(None)
    assert train_block_bw._cache_size() == before


def test_progress_bars(capsys):
    params, ids = W.tiny_setup()
    apiq_bw(params, W.CFG, ids[:2], W.QCFG, W.LCFG, key=jax.random.PRNGKey(1), epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "apiq-bw" in err and "block 0" in err and "loss=" in err


# --- ApiQ-lw ---------------------------------------------------------------------------------
def test_lw_stage_inputs_rebuild_the_block():
    params, ids = W.tiny_setup()
    layer = params["layers"][0]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, W.CFG.hidden_size))
    core = lw_stage_inputs(layer, x, W.CFG, 1)
    h = x + linear(core, layer["o_proj"])
    out = h + linear(lw_stage_inputs(layer, x, W.CFG, 3), layer["down_proj"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(block_forward(layer, x, W.CFG)), atol=1e-5)


def test_lw_stage_loss_is_sum_of_per_linear_losses():
    params, _ = W.tiny_setup()
    layer = params["layers"][0]
    k = jax.random.split(jax.random.PRNGKey(4), 8)
    x = jax.random.normal(k[0], (1, 16, W.CFG.hidden_size))
    xq = x + 0.1 * jax.random.normal(k[1], x.shape)
    names = LW_STAGES[0]
    train = {"clip": {}, "lora": {}}
    lcfg = LoraConfig(rank=4, alpha=8.0)  # scale 2
    for j, n in enumerate(names):
        g, b = init_clip(layer[n].shape, W.QCFG, 3.0)
        train["clip"][n] = {"gamma": g + 0.1 * j, "beta": b}
        out_f, in_f = layer[n].shape
        train["lora"][n] = {"a": 0.1 * jax.random.normal(k[2 + j], (in_f, 4)),
                            "b": 0.1 * jax.random.normal(k[5 + j], (4, out_f))}
    train["lora"] = Lora(train["lora"], lcfg)
    got = _lw_loss(train, layer, x, xq, names, names, W.QCFG)
    want = 0.0
    for n in names:
        q = fake_quantize(layer[n], W.QCFG, clip=(train["clip"][n]["gamma"], train["clip"][n]["beta"]))
        y = linear(xq, q, train["lora"][n])
        want += float(jnp.mean((linear(x, layer[n]) - y) ** 2))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_apiq_lw_reduces_activation_error():
    params, ids = W.tiny_setup()
    res = apiq_lw(params, W.CFG, ids, W.QCFG, W.LCFG, key=jax.random.PRNGKey(1), epochs=3)
    for b in res.report.blocks:
        assert b.error_after < b.error_before, b
        curves = b.extra["stage_loss_curves"]
        assert list(curves) == ["+".join(s) for s in LW_STAGES]
        for c in curves.values():
            assert len(c) == 3 * ids.shape[0] and np.mean(c[-4:]) < np.mean(c[:4])
    assert res.report.method == "apiq-lw"


# --- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["apiq-bw", "apiq-lw"])
def test_bad_inputs_name_the_value(method):
    params, ids = W.tiny_setup()
    fn = METHODS[method]
    key = jax.random.PRNGKey(0)
    bad = ids.copy()
    bad[1, 3] = W.CFG.vocab_size
    with pytest.raises(ValueError, match=r"token id 64 .*sample 1, position 3.*0 <= id < 64"):
        fn(params, W.CFG, bad, W.QCFG, W.LCFG, key=key)
    with pytest.raises(ValueError, match="token id -2"):
        fn(params, W.CFG, -2 * np.ones((1, 4), np.int32), W.QCFG, W.LCFG, key=key)
    with pytest.raises(ValueError, match="empty"):
        fn(params, W.CFG, np.zeros((0, 16), np.int32), W.QCFG, W.LCFG, key=key)
    with pytest.raises(ValueError, match="empty"):
        fn(params, W.CFG, [], W.QCFG, W.LCFG, key=key)
    with pytest.raises(ValueError, match="integers"):
        fn(params, W.CFG, ids.astype(np.float32), W.QCFG, W.LCFG, key=key)
    with pytest.raises(ValueError, match=r"group_size=128 .* 64"):
        fn(params, W.CFG, ids, QuantConfig(2, 128), W.LCFG, key=key)
    with pytest.raises(ValueError, match="quant_config"):
        fn(params, W.CFG, ids, 2, W.LCFG, key=key)
    with pytest.raises(ValueError, match="batch_size=3"):
        fn(params, W.CFG, ids, W.QCFG, W.LCFG, key=key, batch_size=3)
    with pytest.raises(ValueError, match="epochs=-1"):
        fn(params, W.CFG, ids, W.QCFG, W.LCFG, key=key, epochs=-1)
    with pytest.raises(ValueError, match="bits=5"):
        fn(params, W.CFG, ids, QuantConfig(5, 32), W.LCFG, key=key)


def test_options_validation():
    with pytest.raises(ValueError, match="b2=1.5"):
        ApiQOptions(b2=1.5)
    with pytest.raises(ValueError, match="lora_lr"):
        ApiQOptions(lora_lr=float("nan"))
