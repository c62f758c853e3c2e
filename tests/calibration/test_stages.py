"""Stages of a block (apiq_jax/calibration/stages.py): their inputs rebuild the block, and equal a
float64 numpy re-derivation from the model's definition with a partially quantized layer and
its LoRA active (tests/calibration/numpy_llama.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration.blocks import float32_view, freeze_layer
from apiq_jax.calibration.stages import STAGES, stage_input, stage_inputs
from apiq_jax.lora import LINEARS, Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward, init_params, linear
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize
from tests.calibration import numpy_llama as ref
from tests.calibration import resume_worker as W

# a block with every bias, random norms, and LoRA on all seven linears
CFG = ModelConfig("LlamaForCausalLM", 64, 64, 96, 1, 4, 2, 16, qkv_bias=True, o_bias=True, mlp_bias=True)
QCFG = QuantConfig(2, 32)
LCFG = LoraConfig(rank=4, alpha=8.0)


def random_layer(cfg: ModelConfig, seed: int) -> dict:
    """Layer 0 of a random model (weights std 0.05) with norms ``1 + 0.2 N(0, 1)``."""
    layer = dict(init_params(cfg, jax.random.PRNGKey(seed), std=0.05)["layers"][0])
    rng = np.random.default_rng(seed)
    for n in ("input_layernorm", "post_attention_layernorm"):
        layer[n] = jnp.asarray(1 + 0.2 * rng.standard_normal(layer[n].shape), jnp.float32)
    return layer


def random_lora(layer: dict, seed: int, std: float = 0.1) -> Lora:
    """Non-zero LoRA factors (``b != 0``: the LoRA changes the block) for every linear."""
    rng = np.random.default_rng(seed)
    factors = {}
    for n in LINEARS:
        out_f, in_f = layer[n].shape
        factors[n] = {"a": jnp.asarray(std * rng.standard_normal((in_f, LCFG.rank)), jnp.float32),
                      "b": jnp.asarray(std * rng.standard_normal((LCFG.rank, out_f)), jnp.float32)}
    return Lora(factors, LCFG)


def as_numpy(layer: dict) -> dict:
    """float64 numpy copy of a layer; QuantizedTensors become their dequantized weights."""
    return {k: np.asarray(dequantize(v) if isinstance(v, QuantizedTensor) else v, np.float64) for k, v in layer.items()}


def numpy_lora(lora: Lora | None, names) -> dict | None:
    if lora is None:
        return None
    return {n: (np.asarray(lora[n]["a"], np.float64), np.asarray(lora[n]["b"], np.float64)) for n in names}


def test_stages_cover_every_linear_once_in_block_order():
    assert tuple(n for s in STAGES for n in s.linears) == LINEARS
    assert [s.name for s in STAGES] == ["qkv", "o", "gate_up", "down"]


def test_stage_inputs_rebuild_the_block():
    params, _ = W.tiny_setup()
    layer = params["layers"][0]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, W.CFG.hidden_size))
    core = stage_input(layer, x, W.CFG, 1)
    h = x + linear(core, layer["o_proj"])
    out = h + linear(stage_input(layer, x, W.CFG, 3), layer["down_proj"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(block_forward(layer, x, W.CFG)), atol=1e-5)


@pytest.mark.parametrize("stage", range(len(STAGES)))
def test_stage_input_of_partially_quantized_block_matches_float64(stage):
    """X_q of ``stage``: every shallower linear quantized, its LoRA active (the deeper ones unused)."""
    layer = random_layer(CFG, seed=1)
    lora = random_lora(layer, seed=2)
    shallower = tuple(n for s in STAGES[:stage] for n in s.linears)
    partial = freeze_layer(layer, QCFG, targets=shallower)
    xs = jax.random.normal(jax.random.PRNGKey(4), (2, 12, CFG.hidden_size))
    got = np.asarray(stage_inputs(float32_view(partial), xs, CFG, stage, lora.replace(
        {n: lora.factors[n] for n in shallower}) if shallower else None))
    want = np.stack([ref.stage_input(np.asarray(x, np.float64), as_numpy(partial), CFG, stage,
                                     numpy_lora(lora, shallower), LCFG.scale) for x in xs])
    scale = np.abs(want).max()
    # float32 against float64: max |X_q - ref| / max |ref| measured 1.1e-7, 1.7e-7, 9.5e-8, 2.3e-7
    assert np.abs(got - want).max() / scale < 2e-6
    if shallower:  # the shallower LoRA is active: without it the input is far from the reference
        without = np.stack([ref.stage_input(np.asarray(x, np.float64), as_numpy(partial), CFG, stage, None,
                                            LCFG.scale) for x in xs])
        assert np.abs(without - want).max() / scale > 0.1  # measured 0.58, 0.13, 0.82
