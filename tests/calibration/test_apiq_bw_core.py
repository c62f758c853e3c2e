"""ApiQ-bw math (apiq_jax/calibration/apiq_bw_core.py): the block loss and its gradients at the
recorded starting point of the official ``calibrate()`` (shared/golden/apiq_block.npz)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration.apiq_bw_core import bw_block_loss, train_block_bw
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.lora import LINEARS
from tests.calibration.conftest import golden_start_state
from tests.calibration.golden_helpers import module_name


def _recorded_grads(g, block, n, out):
    prefix = f"grads/{module_name(block, n)}"
    return {
        ("clip", "gamma"): g[f"{prefix}.base_layer.weight_quantizer.upbound_factor"][0].reshape(out, -1),
        ("clip", "beta"): g[f"{prefix}.base_layer.weight_quantizer.lowbound_factor"][0].reshape(out, -1),
        ("lora", "a"): g[f"{prefix}.lora_A.default.weight"][0].T,
        ("lora", "b"): g[f"{prefix}.lora_B.default.weight"][0].T,
    }


@pytest.mark.parametrize("block", [0, 1])
def test_step0_loss_and_gradients(golden, block):
    G = golden
    g, cfg = G["g"], G["cfg"]
    train = golden_start_state(G, block)
    layer = G["params"]["layers"][block]
    x = jnp.asarray(g[f"block{block}/quant_in"][:1])
    t1 = jnp.asarray(g[f"block{block}/fp_target"][:1])
    t2 = jnp.asarray(g[f"block{block}/fp2_target"][:1])
    (loss, terms), grads = jax.value_and_grad(bw_block_loss, has_aux=True)(train, layer, x, t1, t2, cfg, G["qcfg"])
    np.testing.assert_allclose(float(loss), g["loss"][block, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(terms), g["loss_terms"][block, 0, 0], rtol=1e-5)
    for n in LINEARS:
        for (group, leaf), ref in _recorded_grads(g, block, n, layer[n].shape[0]).items():
            got = np.asarray(getattr(grads["clip"][n], leaf) if group == "clip" else grads["lora"][n][leaf])
            scale = np.abs(ref).max()
            if scale == 0:  # d loss / d a is exactly 0 while b = 0 (step 0)
                np.testing.assert_array_equal(got, 0.0)
                continue
            err = np.abs(got - ref).max() / scale
            assert err < 1e-4, f"block {block} {n}.{leaf}: max error {err:.2e} of max |grad|"


def test_aug_term_is_zero_without_second_target(golden):
    G = golden
    g = G["g"]
    train = golden_start_state(G, 0)
    x = jnp.asarray(g["block0/quant_in"][:1])
    t1 = jnp.asarray(g["block0/fp_target"][:1])
    loss, terms = bw_block_loss(train, G["params"]["layers"][0], x, t1, None, G["cfg"], G["qcfg"])
    assert float(terms[1]) == 0.0 and float(loss) == float(terms[0])


def test_train_block_losses_are_taken_before_each_step(golden):
    """The first recorded loss of a block is the loss at its starting point; shapes per epoch and batch."""
    G = golden
    g = G["g"]
    train0 = golden_start_state(G, 0)
    layer = G["params"]["layers"][0]
    x, t1, t2 = (jnp.asarray(g[f"block0/{k}"]) for k in ("quant_in", "fp_target", "fp2_target"))
    opts = ApiQOptions(epochs=2, batch_size=2)
    train, losses, terms = train_block_bw(layer, train0, x, t1, t2, config=G["cfg"], qcfg=G["qcfg"], opts=opts)
    assert losses.shape == (2, 2) and terms.shape == (2, 2, 2)
    first, _ = bw_block_loss(train0, layer, x[:2], t1[:2], t2[:2], G["cfg"], G["qcfg"])
    np.testing.assert_allclose(float(losses[0, 0]), float(first), rtol=1e-6)
    assert jax.tree.structure(train) == jax.tree.structure(train0)


def test_the_block_program_reads_float32_caches_in_place():
    """More samples add no temporary memory: batches are sliced from the caches, not copied whole."""
    from tests.calibration.block_memory import train_block_temp

    few, _ = train_block_temp(256, 688, 4, rank=8, samples=4, seqlen=64)
    many, _ = train_block_temp(256, 688, 4, rank=8, samples=32, seqlen=64)
    extra_caches = 3 * 28 * 64 * 256 * 4  # x_q, t1, t2 of 28 more samples
    assert many - few < 0.1 * extra_caches
