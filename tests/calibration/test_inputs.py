"""Input validation every method shares (apiq_jax/calibration/inputs.py): ValueErrors name the value."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from apiq_jax.calibration import METHODS, ApiQOptions
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.quant import QuantConfig
from tests.calibration import resume_worker as W


@pytest.mark.parametrize("method", ["apiq-bw", "apiq-lw"])
def test_bad_inputs_name_the_value(method):
    params, ids = W.tiny_setup()
    fn = METHODS[method].fn
    key = jax.random.PRNGKey(0)
    bad = ids.copy()
    bad[1, 3] = W.CFG.vocab_size
    with pytest.raises(ValueError, match=r"token id 64 at position \(1, 3\) .*0 <= id < 64"):
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
        fn(params, W.CFG, ids, W.QCFG, W.LCFG, key=key, options=ApiQOptions(batch_size=3))
    with pytest.raises(ValueError, match="options must be"):
        fn(params, W.CFG, ids, W.QCFG, W.LCFG, key=key, options={"epochs": 1})
    with pytest.raises(ValueError, match="key="):
        fn(params, W.CFG, ids, W.QCFG, W.LCFG)
    with pytest.raises(ValueError, match="bits=5"):
        fn(params, W.CFG, ids, QuantConfig(5, 32), W.LCFG, key=key)


def test_params_are_checked(tiny):
    cfg, params, ids = tiny
    qcfg, lcfg = QuantConfig(2, 32), W.LCFG
    with pytest.raises(ValueError, match="2 layers but model_config.num_hidden_layers=3"):
        validate_inputs("rtn", params, W.CFG, ids, qcfg, lcfg)
    broken = dict(params, layers=[dict(params["layers"][0], q_proj=params["layers"][0]["q_proj"][:, :32]),
                                  params["layers"][1]])
    with pytest.raises(ValueError, match=r"layers.0.q_proj has shape \(64, 32\); expected \(64, 64\)"):
        validate_inputs("rtn", broken, cfg, ids, qcfg, lcfg)
    got = validate_inputs("rtn", params, cfg, ids[0], qcfg, lcfg)  # one row
    assert got.shape == (1, ids.shape[1]) and got.dtype == np.int32


def test_rtn_refuses_out_of_range_ids(tiny):
    cfg, params, ids = tiny
    bad = ids.copy()
    bad[0, 0] = cfg.vocab_size
    with pytest.raises(ValueError, match="out of range"):
        METHODS["rtn"].fn(params, cfg, bad, QuantConfig(2, 32), W.LCFG, key=jax.random.PRNGKey(0))
