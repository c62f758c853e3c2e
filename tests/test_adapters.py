"""Bottleneck adapters: identity at init, the residual formula, training moves only the
adapters on a frozen 2-bit model, and they compose with LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.adapters import adapter_forward, adapter_loss_fn, apply_adapter, init_adapters
from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.lora import LoraConfig, merge_lora
from apiq_jax.models import ModelConfig, apply, forward, init_params, load_pretrained, quantize_model
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig, finetune

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)


def test_identity_at_init_and_formula():
    params = init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
    ad = init_adapters(CFG, 4, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(adapter_forward(params, ad, ids, CFG)),
                                  np.asarray(forward(params, None, ids, CFG)))
    # the residual bottleneck against a float64 numpy version
    rng = np.random.default_rng(0)
    a = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ad["layers"][0].items()}
    x = rng.standard_normal((3, CFG.hidden_size)).astype(np.float32)
    h = x.astype(np.float64) @ a["down"].astype(np.float64) + a["down_bias"]
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    want = x + gelu @ a["up"].astype(np.float64) + a["up_bias"]
    got = apply_adapter(jax.tree.map(jnp.asarray, a), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_adapter_training_on_frozen_quantized_model():
    model = load_pretrained(DEMO_MODEL_DIR)
    cfg_m = model.config
    lcfg = LoraConfig(rank=4, alpha=8)
    frozen, lora = quantize_model(model.params, QuantConfig(bits=4, group_size=64), lcfg, key=jax.random.key(1))
    codes = np.asarray(frozen["layers"][0]["up_proj"].codes).copy()
    ids = np.random.default_rng(0).integers(100, 104, size=(32, 32)).astype(np.int32)
    ad0 = init_adapters(cfg_m, 8, key=jax.random.key(3))
    cfg = FinetuneConfig(steps=20, batch_size=8, learning_rate=1e-2)
    ad, losses = finetune(frozen, ad0, ids, cfg_m, cfg, progress=False, loss_fn=adapter_loss_fn(cfg_m))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    np.testing.assert_array_equal(np.asarray(frozen["layers"][0]["up_proj"].codes), codes)
    assert float(jnp.abs(ad["layers"][2]["up"]).max()) > 0
    # composes with LoRA (b != 0, so the LoRA branch really changes the output): zero adapters +
    # LoRA equals the LoRA model, which differs from the model without LoRA
    lora = jax.tree.map(lambda t: t + 0.05, lora)
    x = jnp.asarray(ids[:2])
    with_lora = np.asarray(adapter_forward(frozen, ad0, x, cfg_m, lora=lora))
    np.testing.assert_allclose(with_lora, np.asarray(apply(frozen, lora, x, cfg_m)), rtol=0, atol=1e-5)
    assert np.abs(with_lora - np.asarray(adapter_forward(frozen, ad0, x, cfg_m))).max() > 1e-2
    # trained adapters + LoRA equals the adapters applied to the merged dense model
    trained = np.asarray(adapter_forward(frozen, ad, x, cfg_m, lora=lora))
    np.testing.assert_allclose(trained, np.asarray(adapter_forward(merge_lora(frozen, lora), ad, x, cfg_m)),
                               rtol=0, atol=2e-4 * np.abs(trained).max())


def test_bad_adapter_arguments():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="bottleneck=0"):
        init_adapters(CFG, 0, key=jax.random.key(0))
    ad = init_adapters(CFG, 4, key=jax.random.key(0))
    ad["layers"] = ad["layers"][:1]
    with pytest.raises(ValueError, match="1 layers; the model has 2"):
        adapter_forward(params, ad, jnp.zeros((1, 3), jnp.int32), CFG)
