"""Sharded generation (apiq_jax.generation with a mesh) equals one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax import sharding as S
from apiq_jax.generation import _prefill, generate, left_pad
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.qmatmul import default_backend
from apiq_jax.quant import QuantConfig

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64)
#: 3 prompts of different lengths: padded to the data axis with copies of the last
PROMPTS = [[5, 9, 2, 33], [7], [1, 2, 3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def model():
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=4), key=jax.random.key(1))
    return frozen, jax.tree.map(lambda x: x + 0.05, lora)


@pytest.mark.parametrize("spec", ["data=8", "data=4,fsdp=2"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_on_8_devices_equals_one(model, spec, temperature):
    frozen, lora = model
    kw = dict(max_new_tokens=12, temperature=temperature, top_k=20, seed=3, return_logits=True)
    ref = generate(frozen, lora, PROMPTS, CFG, **kw)
    streamed = []
    got = generate(frozen, lora, PROMPTS, CFG, mesh=S.make_mesh(spec), callback=streamed.append, **kw)
    assert got.tokens.shape == ref.tokens.shape == (3, 12)      # the padding rows are dropped
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logits, ref.logits, rtol=0, atol=1e-5)   # float32, another reduction order
    assert [t.shape for t in streamed] == [(3,)] * 12
    np.testing.assert_array_equal(np.stack(streamed, axis=1), got.tokens)


def test_prompts_and_cache_split_by_rows(model):
    frozen, lora = model
    mesh = S.make_mesh("data=8")
    ids, mask = left_pad(PROMPTS * 8)   # 24 rows: 3 per device
    rows = jax.sharding.NamedSharding(mesh, S.batch_spec(mesh, 24))
    f = jnp.float32
    token, logits, cache, key_mask = _prefill(
        S.place(frozen, mesh), S.place(lora, mesh), S.place_batch(ids, mesh), S.place_batch(mask, mesh),
        jax.random.key(0), f(1), jnp.int32(0), f(1), config=CFG, backend=default_backend(), cache_len=16,
        greedy=True, rows=rows)
    for k, v in cache:
        assert {s.data.shape for s in k.addressable_shards} == {(3, 16, 2, 16)}
        assert {s.data.shape for s in v.addressable_shards} == {(3, 16, 2, 16)}
    assert {s.data.shape for s in token.addressable_shards} == {(3,)}
