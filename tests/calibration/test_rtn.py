"""RTN and the QLoRA init (apiq_jax/calibration/rtn.py) on a tiny Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import CalibrationResult, qlora_init, rtn_init
from apiq_jax.lora import LINEARS
from apiq_jax.models.llama import forward
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize, fake_quantize
from tests.calibration.conftest import TINY_LCFG as LCFG


def check_result(res: CalibrationResult, cfg, params, method: str) -> None:
    """Every linear frozen, LoRA of the config's shapes, one finite error per block."""
    assert isinstance(res, CalibrationResult)
    assert res.report.method == method
    assert res.lora.scale == pytest.approx(LCFG.scale) and res.lora.config == LCFG
    assert len(res.report.blocks) == cfg.num_hidden_layers
    for i, layer in enumerate(res.params["layers"]):
        for name in LINEARS:
            qt = layer[name]
            assert isinstance(qt, QuantizedTensor) and qt.shape == params["layers"][i][name].shape
            lo = res.lora["layers"][i][name]
            out_f, in_f = qt.shape
            assert lo["a"].shape == (in_f, LCFG.rank) and lo["b"].shape == (LCFG.rank, out_f)
    assert all(e is not None and np.isfinite(e) for e in res.report.errors_after)


@pytest.mark.parametrize("fn,name,scheme", [(rtn_init, "rtn", "asym"), (qlora_init, "qlora", "nf")])
def test_rtn_and_qlora_init(tiny, fn, name, scheme):
    cfg, params, ids = tiny
    qcfg = QuantConfig(bits=2, group_size=32, scheme=scheme)
    res = fn(params, cfg, ids, qcfg, LCFG, key=jax.random.PRNGKey(2))
    check_result(res, cfg, params, name)
    for i, layer in enumerate(res.lora["layers"]):
        for nm, ab in layer.items():
            assert not np.any(np.asarray(ab["b"]))  # b = 0
            bound = 1.0 / np.sqrt(ab["a"].shape[0])
            a = np.asarray(ab["a"])
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound  # kaiming-uniform
            np.testing.assert_array_equal(
                np.asarray(dequantize(res.params["layers"][i][nm])),
                np.asarray(fake_quantize(params["layers"][i][nm], qcfg)),
            )
    # with b = 0 the model is the plain RTN model
    logits = forward(res.params, res.lora, jnp.asarray(ids), cfg)
    plain = forward(res.params, None, jnp.asarray(ids), cfg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=0, atol=1e-6)
