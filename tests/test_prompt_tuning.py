"""Prompt tuning: the soft prompt equals extra vocabulary rows prepended as tokens; training
it moves only the prompt and fits a learnable sequence task on a frozen 2-bit model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.lora import LoraConfig, merge_lora
from apiq_jax.models import ModelConfig, forward, init_params, load_pretrained, quantize_model
from apiq_jax.prompt_tuning import init_prompt, prompt_forward, prompt_loss_fn
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig, finetune

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
)


def test_soft_prompt_equals_prepended_extra_tokens():
    params = init_params(CFG, jax.random.key(0))
    prompt = jax.random.normal(jax.random.key(1), (5, CFG.hidden_size)) * 0.1
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, CFG.vocab_size)
    # reference: append the prompt vectors to the embedding table as 5 new tokens
    ext_cfg = dataclasses.replace(CFG, vocab_size=CFG.vocab_size + 5)
    ext = dict(params, embed_tokens=jnp.concatenate([params["embed_tokens"], prompt]))
    ext_ids = jnp.concatenate([jnp.broadcast_to(CFG.vocab_size + jnp.arange(5), (2, 5)), ids], axis=1)
    want = forward(ext, None, ext_ids, ext_cfg)[:, 5:]
    got = prompt_forward(params, prompt, ids, CFG)
    assert got.shape == (2, 7, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_prompt_training_on_frozen_quantized_model():
    model = load_pretrained(DEMO_MODEL_DIR)  # a real pretrained model: a prompt can steer it
    cfg_m = model.config
    frozen, lora = quantize_model(model.params, QuantConfig(bits=4, group_size=64), LoraConfig(rank=4, alpha=8),
                                  key=jax.random.key(1))
    codes = np.asarray(frozen["layers"][1]["down_proj"].codes).copy()
    # random text over 4 tokens, which the model finds very unlikely (loss ~15.6 nats at first)
    ids = np.random.default_rng(0).integers(100, 104, size=(32, 32)).astype(np.int32)
    prompt0 = init_prompt(frozen, cfg_m, 8, key=jax.random.key(3))
    table = np.asarray(frozen["embed_tokens"])  # "vocab" init copies rows of the embedding table
    assert all(np.any(np.all(table == row, axis=1)) for row in np.asarray(prompt0))
    cfg = FinetuneConfig(steps=20, batch_size=8, learning_rate=3e-2)
    prompt, losses = finetune(frozen, prompt0, ids, cfg_m, cfg, progress=False, loss_fn=prompt_loss_fn(cfg_m))
    assert prompt.shape == prompt0.shape
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses  # measured ~0.45
    np.testing.assert_array_equal(np.asarray(frozen["layers"][1]["down_proj"].codes), codes)
    # with LoRA too (b != 0, so the LoRA branch is active): the LoRA tree is a constant of the
    # prompt loss, and the prompted LoRA model equals the prompted merged dense model
    lora = jax.tree.map(lambda t: t + 0.05, lora)
    x = jnp.asarray(ids[:2])
    loss = prompt_loss_fn(cfg_m, lora=lora)
    g = jax.grad(loss, argnums=1)(frozen, prompt, x)
    assert g.shape == prompt.shape and float(jnp.abs(g).max()) > 0
    with_lora = np.asarray(prompt_forward(frozen, prompt, x, cfg_m, lora=lora))
    np.testing.assert_allclose(with_lora, np.asarray(prompt_forward(merge_lora(frozen, lora), prompt, x, cfg_m)),
                               rtol=0, atol=2e-4 * np.abs(with_lora).max())
    assert np.abs(with_lora - np.asarray(prompt_forward(frozen, prompt, x, cfg_m))).max() > 1e-2
    assert abs(float(loss(frozen, prompt, x)) - float(prompt_loss_fn(cfg_m)(frozen, prompt, x))) > 1e-3


def test_bad_prompt_arguments():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="n_tokens=0"):
        init_prompt(params, CFG, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="init='zeros'.*accepted"):
        init_prompt(params, CFG, 4, key=jax.random.key(0), init="zeros")
    with pytest.raises(ValueError, match=r"expected \[n_tokens, 32\]"):
        prompt_forward(params, jnp.zeros((4, 16)), jnp.zeros((1, 3), jnp.int32), CFG)
    normal = init_prompt(params, CFG, 64, key=jax.random.key(0), init="normal")
    assert abs(float(normal.std()) / float(params["embed_tokens"].std()) - 1) < 0.2
