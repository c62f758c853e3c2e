"""ApiQ-lw math (apiq_jax/calibration/apiq_lw_core.py): the stage loss is the sum of the per-linear
objectives, whichever linears are stacked and vmapped together."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.calibration.apiq_lw_core import _shape_groups, lw_stage_loss, train_stage_lw
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.calibration.stages import STAGES
from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.llama import linear
from apiq_jax.quant import ClipLogits, fake_quantize, init_clip
from tests.calibration import resume_worker as W


def _train(layer, names, key, lora_names):
    k = jax.random.split(key, 2 * len(names))
    clip, factors = {}, {}
    for j, n in enumerate(names):
        g = init_clip(layer[n].shape, W.QCFG, 3.0)
        clip[n] = ClipLogits(g.gamma + 0.1 * j, g.beta)
        out_f, in_f = layer[n].shape
        if n in lora_names:
            factors[n] = {"a": 0.1 * jax.random.normal(k[2 * j], (in_f, 4)),
                          "b": 0.1 * jax.random.normal(k[2 * j + 1], (4, out_f))}
    return {"clip": clip, "lora": Lora(factors, LoraConfig(rank=4, alpha=8.0))}  # scale 2


def _per_linear(train, layer, x, xq, names):
    total = 0.0
    for n in names:
        q = fake_quantize(layer[n], W.QCFG, clip=train["clip"][n])
        lo = train["lora"].get(n)
        total += float(jnp.mean((linear(x, layer[n]) - linear(xq, q, lo)) ** 2))
    return total


def test_stage_loss_is_sum_of_per_linear_losses():
    params, _ = W.tiny_setup()
    layer = params["layers"][0]
    k = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(k[0], (1, 16, W.CFG.hidden_size))
    xq = x + 0.1 * jax.random.normal(k[1], x.shape)
    names = STAGES[0].linears
    # q/k/v have two shapes (q: 64x64, k/v: 32x64); LoRA on q and v only: three stacked groups
    lora_names = ("q_proj", "v_proj")
    assert len(_shape_groups(names, layer, lora_names)) == 3
    train = _train(layer, names, k[2], lora_names)
    got = lw_stage_loss(train, layer, x, xq, names, lora_names, W.QCFG)
    np.testing.assert_allclose(float(got), _per_linear(train, layer, x, xq, names), rtol=1e-5)


def test_train_stage_records_the_loss_before_each_step():
    params, _ = W.tiny_setup()
    layer = params["layers"][0]
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 8, W.CFG.intermediate_size))
    xq = x + 0.05 * jax.random.normal(jax.random.PRNGKey(6), x.shape)
    names = STAGES[3].linears
    train0 = _train(layer, names, jax.random.PRNGKey(7), names)
    opts = ApiQOptions(epochs=2, batch_size=2)
    train, losses, terms = train_stage_lw(layer, train0, x, xq, names=names, lora_names=names, qcfg=W.QCFG, opts=opts)
    assert losses.shape == (2, 2) and terms.shape == (2, 2, 1)
    first = lw_stage_loss(train0, layer, x[:2], xq[:2], names, names, W.QCFG)
    np.testing.assert_allclose(float(losses[0, 0]), float(first), rtol=1e-6)
    assert float(losses[1].mean()) < float(losses[0].mean())
