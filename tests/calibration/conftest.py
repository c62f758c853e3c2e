"""Fixtures shared by the calibration tests: the recorded official ApiQ run, tiny random models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import ApiQOptions, apiq_bw
from apiq_jax.lora import LINEARS, Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params
from apiq_jax.quant import QuantConfig, init_clip
from tests.calibration.golden_helpers import (
    golden_configs,
    golden_lora,
    golden_model_config,
    golden_params,
    load_golden,
)
from tests.conftest import require_shared

#: baselines' tiny model: 2 layers, MLP width 88 (a partial last group at group size 32)
TINY_CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=88,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)
TINY_QCFG = QuantConfig(bits=2, group_size=32)
TINY_LCFG = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="session")
def golden():
    """shared/golden/apiq_block.npz (official ``calibrate()`` run) in this library's layout."""
    g, meta = load_golden(require_shared("golden", "apiq_block.npz"))
    cfg = golden_model_config(meta)
    qcfg, lcfg = golden_configs(meta)
    params = jax.tree.map(jnp.asarray, golden_params(g, cfg))
    lora0 = jax.tree.map(jnp.asarray, golden_lora(g, cfg))
    args = meta["calibrate_args"]
    opts = ApiQOptions(
        epochs=args["epochs"], aug_loss=args["aug_loss"], lora_lr=args["peft_lr"], clip_lr=args["lwc_lr"],
        lora_weight_decay=args["peft_wd"], clip_weight_decay=args["lwc_wd"], batch_size=args["batch_size"],
    )
    return dict(g=g, meta=meta, cfg=cfg, qcfg=qcfg, lcfg=lcfg, params=params, lora0=lora0, opts=opts)


@pytest.fixture(scope="session")
def golden_run(golden):
    """Our full ApiQ-bw calibration from the recorded initial state."""
    G = golden
    return apiq_bw(G["params"], G["cfg"], G["g"]["calib_ids"], G["qcfg"], G["lcfg"], lora_init=G["lora0"],
                   options=G["opts"])


def golden_start_state(G, i):
    """Block i's recorded starting point: clip logits 4.0, the recorded initial LoRA."""
    layer = G["params"]["layers"][i]
    return {
        "clip": {n: init_clip(layer[n].shape, G["qcfg"], 4.0) for n in LINEARS},
        "lora": Lora(G["lora0"]["layers"][i], G["lcfg"]),
    }


@pytest.fixture(scope="session")
def loftq_golden():
    """shared/golden/loftq.npz (peft 0.11.1 ``loftq_init``)."""
    return dict(np.load(require_shared("golden", "loftq.npz")))


@pytest.fixture(scope="session")
def tiny():
    """(config, params, ids [4, 24]) of a random 2-layer Llama."""
    params = init_params(TINY_CFG, jax.random.PRNGKey(0))
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, TINY_CFG.vocab_size), np.int32)
    return TINY_CFG, params, ids
