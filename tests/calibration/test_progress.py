"""Progress bars (apiq_jax/calibration/progress.py): epochs reported from inside the compiled
program reach the bar of the call that runs it, whichever call compiled the program."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apiq_jax.calibration import ApiQOptions, apiq_bw
from apiq_jax.calibration.progress import Progress, report_epoch
from tests.calibration import resume_worker as W


def test_progress_bars(capsys):
    params, ids = W.tiny_setup()
    apiq_bw(params, W.CFG, ids[:2], W.QCFG, W.LCFG, key=jax.random.PRNGKey(1), options=ApiQOptions(epochs=1),
            progress=True)
    err = capsys.readouterr().err
    assert "apiq-bw" in err and "block 0" in err and "loss=" in err


@jax.jit
def _epochs(token, losses):
    for e in range(losses.shape[0]):
        report_epoch(token, jnp.int32(e), losses[e])
    return losses.sum()


def test_reports_reach_the_bar_of_the_call():
    losses = jnp.arange(3.0)
    first = Progress(True, 1, "first")
    first.start_inner("block 0", 3)
    second = Progress(True, 1, "second")
    second.start_inner("block 0", 3)
    _epochs(second.token(), losses).block_until_ready()
    jax.effects_barrier()
    assert second.inner.n == 3 and first.inner.n == 0
    _epochs(first.token(), losses).block_until_ready()  # the same compiled program
    jax.effects_barrier()
    assert first.inner.n == 3 and second.inner.n == 3
    assert _epochs._cache_size() == 1
    second.close()
    _epochs(second.token(), losses).block_until_ready()  # a closed bar: dropped, no error
    jax.effects_barrier()
    first.close()


def test_disabled_bars_report_nothing():
    bar = Progress(False, 2, "off")
    assert bar.token() is None and bar.outer is None
    bar.start_inner("block 0", 1)
    bar.epoch_done(0, 1.0)
    bar.block_done(error="x")
    bar.close()
