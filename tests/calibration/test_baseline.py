"""The baselines' shared result (apiq_jax/calibration/baseline.py): per-block errors or None."""

from __future__ import annotations

import jax
import numpy as np

from apiq_jax.calibration import rtn_init
from apiq_jax.evaluate import activation_errors
from tests.calibration.conftest import TINY_LCFG, TINY_QCFG


def test_errors_are_the_activation_errors_on_the_calibration_ids(tiny):
    cfg, params, ids = tiny
    res = rtn_init(params, cfg, ids, TINY_QCFG, TINY_LCFG, key=jax.random.PRNGKey(0))
    # streamed block by block (per-sample float32 sums) vs the whole-model batched evaluation: same quantity
    want = activation_errors(params, res.params, ids, config=cfg, lora=res.lora)
    np.testing.assert_allclose(res.report.errors_after, want, rtol=1e-5)
    assert res.report.errors_before == [None, None] and res.report.extra["eval_seconds"] >= 0
    skipped = rtn_init(params, cfg, ids, TINY_QCFG, TINY_LCFG, key=jax.random.PRNGKey(0), measure_error=False)
    assert skipped.report.errors_after == [None, None]
    assert [b.index for b in skipped.report.blocks] == [0, 1]
