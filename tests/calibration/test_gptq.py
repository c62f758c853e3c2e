"""GPTQ-LoRA (apiq_jax/calibration/gptq.py) on a tiny Llama: sequential Hessians through the shared
stage wiring, then the QLoRA init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import gptq_init, rtn_init
from apiq_jax.calibration.blocks import embed_ids
from apiq_jax.calibration.gptq import stage_hessian
from apiq_jax.calibration.gptq_core import hessian_from_inputs
from apiq_jax.calibration.stages import STAGES, stage_inputs
from apiq_jax.lora import LINEARS
from apiq_jax.quant import QuantConfig
from tests.calibration.conftest import TINY_LCFG as LCFG
from tests.calibration.conftest import TINY_QCFG as QCFG
from tests.calibration.test_rtn import check_result


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_init_model(tiny, true_sequential):
    cfg, params, ids = tiny
    res = gptq_init(params, cfg, ids, QCFG, LCFG, key=jax.random.PRNGKey(2), true_sequential=true_sequential)
    check_result(res, cfg, params, "gptq")
    assert not np.any(np.asarray(res.lora["layers"][0]["q_proj"]["b"]))
    rtn = rtn_init(params, cfg, ids, QCFG, LCFG, key=jax.random.PRNGKey(2))
    # GPTQ minimises each linear's output error on the calibration inputs
    assert res.report.errors_after[-1] < rtn.report.errors_after[-1]
    assert set(res.report.blocks[0].extra["gptq_loss"]) == set(LINEARS)




def test_gptq_refuses_double_quant(tiny):
    cfg, params, ids = tiny
    with pytest.raises(ValueError, match="double"):
        gptq_init(params, cfg, ids, QuantConfig(bits=2, group_size=32, double_quant=True), LCFG,
                  key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="percdamp"):
        gptq_init(params, cfg, ids, QCFG, LCFG, key=jax.random.PRNGKey(0), percdamp=1.5)


@pytest.mark.parametrize("stage", range(len(STAGES)))
def test_stage_hessian_is_the_hessian_of_the_stage_inputs(tiny, stage):
    cfg, params, ids = tiny
    layer = params["layers"][0]
    xs = embed_ids(params, ids, cfg)
    want = hessian_from_inputs(stage_inputs(layer, xs, cfg, stage))
    got = stage_hessian(layer, xs, cfg, stage)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
