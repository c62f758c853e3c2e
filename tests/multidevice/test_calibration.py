"""Calibration under a mesh (``jax.set_mesh``): samples split over 8 devices give the one-device results.

The gradient-free passes (targets, propagation, errors) run one sample loop per device; ApiQ-bw's
training step is data-parallel when ``batch_size`` is a multiple of the ``data`` axis and
replicated otherwise (the reference's batch_size=1).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from apiq_jax import sharding as S
from apiq_jax.calibration import ApiQOptions, apiq_bw, rtn_init
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params
from apiq_jax.quant import QuantConfig

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
QCFG = QuantConfig(bits=2, group_size=32)
LCFG = LoraConfig(rank=4)
#: ||mesh - single||_F / ||single||_F of every LoRA factor and clip logit (float32; the loss terms
#: and gradients of a data-parallel batch are summed in another order)
RTOL = 1e-5


@pytest.fixture(scope="module")
def inputs():
    params = init_params(CFG, jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(2), (16, 24), 0, CFG.vocab_size))
    return params, ids


def _run(params, ids, batch_size, mesh):
    opts = ApiQOptions(epochs=2, batch_size=batch_size)
    if mesh is None:
        return apiq_bw(params, CFG, ids, QCFG, LCFG, key=jax.random.key(1), options=opts)
    with jax.set_mesh(mesh):
        return apiq_bw(params, CFG, ids, QCFG, LCFG, key=jax.random.key(1), options=opts)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("batch_size", [8, 1])
def test_apiq_bw_on_8_devices_equals_one(inputs, batch_size):
    params, ids = inputs
    ref = _run(params, ids, batch_size, None)
    got = _run(params, ids, batch_size, S.make_mesh("data=8"))
    for a, b in zip(jax.tree.leaves((got.lora, got.extras["clip"])), jax.tree.leaves((ref.lora, ref.extras["clip"])),
                    strict=True):
        assert _rel(a, b) <= RTOL
    for g, r in zip(got.report.blocks, ref.report.blocks, strict=True):
        np.testing.assert_allclose([g.error_before, g.error_after], [r.error_before, r.error_after], rtol=1e-5)
        np.testing.assert_allclose(g.loss_curve, r.loss_curve, rtol=1e-5)


def test_gradient_free_passes_are_split_over_samples(inputs):
    from apiq_jax.calibration.blocks import embed_ids, run_block

    params, ids = inputs
    with jax.set_mesh(S.make_mesh("data=4,fsdp=2")):
        x0 = embed_ids(params, ids, CFG)
        assert {s.data.shape[0] for s in x0.addressable_shards} == {16 // 8}   # 2 samples per device
        y = run_block(params["layers"][0], x0, CFG)
        assert y.sharding.spec[0] == ("data", "fsdp")
    ref = run_block(params["layers"][0], embed_ids(params, ids, CFG), CFG)
    assert _rel(y, ref) <= 1e-6
    rtn_ref = rtn_init(params, CFG, ids, QCFG, LCFG, key=jax.random.key(1))
    with jax.set_mesh(S.make_mesh("data=8")):
        rtn = rtn_init(params, CFG, ids, QCFG, LCFG, key=jax.random.key(1))
    for g, r in zip(rtn.report.blocks, rtn_ref.report.blocks, strict=True):
        np.testing.assert_allclose(g.error_after, r.error_after, rtol=1e-5)
