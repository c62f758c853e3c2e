"""LoRA finetuning on a frozen 2-bit model: learning happens, frozen stays frozen, resume is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import apiq_jax.training as ft
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.quant import QuantConfig

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0))
    lcfg = LoraConfig(rank=4, alpha=8)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=32), lcfg, key=jax.random.key(1))
    # A learnable language: each row counts upwards modulo the vocab from a random start.
    starts = np.random.default_rng(0).integers(0, 64, size=32)
    ids = (starts[:, None] + np.arange(24)[None]) % 64
    return frozen, lora, lcfg, ids.astype(np.int32)


def test_loss_falls_and_frozen_is_untouched(setup):
    frozen, lora, lcfg, ids = setup
    codes_before = np.asarray(frozen["layers"][0]["q_proj"].codes).copy()
    cfg = ft.FinetuneConfig(steps=60, batch_size=8, learning_rate=2e-2, warmup_steps=3)
    new_lora, losses = ft.finetune(frozen, lora, ids, CFG, cfg, progress=False)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses  # ~0.79 measured
    np.testing.assert_array_equal(frozen["layers"][0]["q_proj"].codes, codes_before)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_lora, lora)
    assert all(v > 0 for v in jax.tree.leaves(moved))


def test_gradient_tree_is_the_lora_tree(setup):
    frozen, lora, lcfg, ids = setup
    grads = jax.grad(ft.causal_lm_loss, argnums=1)(frozen, lora, jnp.asarray(ids[:2]), CFG)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)


def test_interrupted_run_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    frozen, lora, lcfg, ids = setup
    cfg = ft.FinetuneConfig(steps=6, batch_size=4, learning_rate=1e-3, save_every=3)
    full, full_losses = ft.finetune(frozen, lora, ids, CFG, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    real = ft.batch_indices

    def crash_at_step_4(n, b, step, seed):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(n, b, step, seed)

    monkeypatch.setattr(ft, "batch_indices", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(frozen, lora, ids, CFG, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(ft, "batch_indices", real)
    resumed, resumed_losses = ft.finetune(frozen, lora, ids, CFG, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
    np.testing.assert_array_equal(resumed_losses, full_losses)


def test_bad_input(setup):
    frozen, lora, lcfg, ids = setup
    with pytest.raises(ValueError, match="steps=0"):
        ft.FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="accepted: 0 <= id < 64"):
        ft.finetune(frozen, lora, ids + 64, CFG, ft.FinetuneConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="shape"):
        ft.finetune(frozen, lora, ids[0], CFG, ft.FinetuneConfig(steps=1), progress=False)


def test_schedule_warmup_and_first_step():
    no_warmup = ft.make_optimizer(ft.FinetuneConfig(steps=10, learning_rate=1e-2, max_grad_norm=None))
    params = {"w": jnp.ones(3)}
    updates, _ = no_warmup.update({"w": jnp.ones(3)}, no_warmup.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 5e-3  # step 0 moves at (nearly) the peak rate
    warm = ft.make_optimizer(ft.FinetuneConfig(steps=10, learning_rate=1e-2, warmup_steps=4, max_grad_norm=None))
    updates, _ = warm.update({"w": jnp.ones(3)}, warm.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0  # linear warm-up starts from 0
