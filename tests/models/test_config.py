"""ModelConfig: validation, hashing, attention windows, RoPE frequencies, reading transformers configs."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from apiq_jax.models import ModelConfig
from tests.conftest import require_module

transformers = require_module("transformers")


def test_config_dataclass_is_hashable_and_validates():
    cfg = ModelConfig("LlamaForCausalLM", 16, 8, 12, 1, 2, 1, 4)
    assert hash(cfg) == hash(ModelConfig("LlamaForCausalLM", 16, 8, 12, 1, 2, 1, 4))
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig("LlamaForCausalLM", 16, 8, 12, 1, 4, 3, 4)
    with pytest.raises(ValueError, match="architecture='GPT2'"):
        ModelConfig("GPT2", 16, 8, 12, 1, 2, 1, 4)
    with pytest.raises(ValueError, match="head_dim=5 must be even"):
        ModelConfig("LlamaForCausalLM", 16, 8, 12, 1, 2, 1, 5)
    mixed = ModelConfig("Qwen2ForCausalLM", 16, 8, 12, 2, 2, 1, 4, sliding_window=4,
                        layer_types=("full_attention", "sliding_attention"))
    assert mixed.attention_window(0) is None and mixed.attention_window(1) == 4
    with pytest.raises(ValueError, match="pass layer_idx"):
        mixed.attention_window(None)
    assert jnp.asarray(mixed.inv_freq()).shape == (2,)


def test_unsupported_rope_and_activation():
    base = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                    intermediate_size=40, vocab_size=16)
    base.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match=r"rope_type='yarn'.*accepted"):
        ModelConfig.from_hf(base)
    gelu = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                    intermediate_size=40, vocab_size=16, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
        ModelConfig.from_hf(gelu)
