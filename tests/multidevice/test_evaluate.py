"""Sharded evaluation (apiq_jax.evaluate with a mesh) equals one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from apiq_jax import sharding as S
from apiq_jax.evaluate import perplexity_ids
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.quant import QuantConfig

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4"])
def test_perplexity_on_8_devices_equals_one(spec):
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=4), key=jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (11, 24), 0, CFG.vocab_size))  # 11: a padded batch
    ref = perplexity_ids(frozen, ids, config=CFG, lora=lora, batch_size=4)
    got = perplexity_ids(frozen, ids, config=CFG, lora=lora, batch_size=4, mesh=S.make_mesh(spec))
    assert got.tokens == ref.tokens == 11 * 23
    assert abs(got.mean_nll - ref.mean_nll) <= 1e-6 * ref.mean_nll
