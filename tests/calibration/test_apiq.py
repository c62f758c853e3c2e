"""What ApiQ-bw and ApiQ-lw share (apiq_jax/calibration/apiq.py): the starting point of every block
and the assembled result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.calibration import ApiQOptions, apiq_bw
from apiq_jax.calibration.apiq import ApiQContext
from apiq_jax.lora import LINEARS, init_lora
from apiq_jax.quant import ClipLogits, QuantizedTensor
from tests.calibration import resume_worker as W


def test_every_block_starts_from_clip_init_and_the_initial_lora():
    params, _ = W.tiny_setup()
    lora0 = init_lora(params, W.LCFG, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    ctx = ApiQContext(W.CFG, W.QCFG, ApiQOptions(clip_init=2.5), lora0)
    state = ctx.start_state(1, params["layers"][1])
    assert list(state["clip"]) == list(LINEARS)
    for n in LINEARS:
        clip = state["clip"][n]
        out_f, in_f = params["layers"][1][n].shape
        assert isinstance(clip, ClipLogits) and clip.gamma.shape == (out_f, -(-in_f // 32))
        np.testing.assert_array_equal(np.asarray(clip.beta), 2.5)
    assert state["lora"]["q_proj"]["a"].dtype == jnp.float32  # trained in float32
    np.testing.assert_array_equal(np.asarray(state["lora"]["q_proj"]["a"]),
                                  np.asarray(lora0["layers"][1]["q_proj"]["a"], np.float32))


def test_result_keeps_the_dtypes_and_the_typed_clip_logits():
    params, ids = W.tiny_setup()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lora0 = init_lora(params, W.LCFG, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    res = apiq_bw(params, W.CFG, ids[:2], W.QCFG, W.LCFG, lora_init=lora0.factors, options=ApiQOptions(epochs=1))
    for i, layer in enumerate(res.params["layers"]):
        assert layer["input_layernorm"] is params["layers"][i]["input_layernorm"]  # shared, not copied
        for n in LINEARS:
            assert isinstance(layer[n], QuantizedTensor) and layer[n].dtype == "bfloat16"
            # the initial LoRA's dtype (lora_from_factors returns float32 factors by default)
            assert res.lora["layers"][i][n]["b"].dtype == jnp.float32
            assert isinstance(res.extras["clip"]["layers"][i][n], ClipLogits)
    assert res.params["embed_tokens"] is params["embed_tokens"]
    assert res.report.options == ApiQOptions(epochs=1).to_dict()
    assert res.report.extra == {"resumed_from_block": 0, "work_dir": None}
