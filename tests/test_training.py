"""LoRA finetuning on a frozen 2-bit model: learning happens, frozen stays frozen, resume is exact."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# --- scan, remat, accumulation, chunked loss, 16-bit ----------------------------------------
from apiq_jax.models import llama as L  # noqa: E402

LOSS_CFG = ModelConfig(  # vocab large enough that a small chunk_tokens cuts the loss into chunks
    architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=96,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)


def _rel(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` of two pytrees flattened into one vector (float64)."""
    la = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    lb = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(la - lb) / np.linalg.norm(lb))


def _capture_grads() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last gradient and whose updates are zero."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )


@pytest.fixture(scope="module")
def big():
    # float32 rounding of a gradient grows with the model's conditioning: these weights keep
    # two float32 computations of the plain step itself within ~5e-7 of each other
    params = init_params(LOSS_CFG, jax.random.key(0), std=0.05)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=32), LoraConfig(rank=4, alpha=8),
                                  key=jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora = lora.replace({"layers": [{n: {"a": ab["a"], "b": 0.1 * jax.random.normal(next(keys), ab["b"].shape)}
                                     for n, ab in layer.items()} for layer in lora["layers"]]})
    starts = np.random.default_rng(0).integers(0, 256, 8)
    ids = jnp.asarray((starts[:, None] + np.arange(24)) % 256, jnp.int32)
    return frozen, lora, ids


def _step_grads(frozen, lora, ids, cfg: ft.FinetuneConfig, stacked: bool):
    step = ft.make_train_step(LOSS_CFG, _capture_grads(), backend="xla", finetune_config=cfg)
    f, lo = (L.stack_layers(frozen), lora.stack_layers()) if stacked else (frozen, lora)
    _, grads, loss = step(f, lo, _capture_grads().init(lo), ids)
    return float(loss), grads.unstack_layers() if stacked else grads


@pytest.mark.parametrize("remat,accum", [("none", 4), ("block", 4), ("dots", 2), ("sqrt", 4), ("block", 1)])
def test_scan_remat_accumulation_equal_the_plain_step(big, remat, accum, monkeypatch):
    """Stacked layers + remat + accumulation of 4 micro-batches of 2 (+ chunked loss) give the
    loss and LoRA gradients of the plain step (unrolled, no remat, one batch of 8), float32."""
    frozen, lora, ids = big
    plain_loss, plain = _step_grads(frozen, lora, ids, ft.FinetuneConfig(batch_size=8), stacked=False)
    monkeypatch.setattr(ft, "LOSS_CHUNK_LOGITS", 256 * 40)  # 40 tokens per loss chunk: 5 chunks of 184
    loss, grads = _step_grads(frozen, lora, ids, ft.FinetuneConfig(batch_size=8, remat=remat, grad_accum=accum),
                              stacked=True)
    assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss)  # measured <= 3e-7
    assert _rel(grads, plain) <= 1e-6  # measured 5.5e-7
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_chunked_loss_equals_the_full_logits_loss(big):
    frozen, lora, ids = big
    x = L.embed(frozen, ids, LOSS_CFG)
    h = L.hidden_states(frozen, lora, x, LOSS_CFG)

    def full(h):
        return ft.next_token_nll(L.final_logits(frozen, h, LOSS_CFG), ids)

    def chunked(h):
        return ft.next_token_nll_from_hidden(frozen, h, ids, LOSS_CFG, chunk_tokens=17)  # 11 chunks, the last padded

    (l_full, g_full), (l_chunk, g_chunk) = jax.value_and_grad(full)(h), jax.jit(jax.value_and_grad(chunked))(h)
    assert abs(float(l_chunk) - float(l_full)) <= 1e-6 * float(l_full)
    assert _rel(g_chunk, g_full) <= 1e-6
    # numpy float64 reference of the loss
    logits = np.asarray(L.final_logits(frozen, h, LOSS_CFG), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], -1).mean()
    assert abs(float(l_chunk) - ref) <= 1e-6 * ref
    with pytest.raises(ValueError, match="chunk_tokens=0 must be a positive int"):
        ft.next_token_nll_from_hidden(frozen, h, ids, LOSS_CFG, chunk_tokens=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_finetuning_runs_close_to_float32(setup, dtype):
    """16-bit compute, float32 LoRA master weights and optimizer state: the losses of 30 steps
    stay within 2% of float32's (measured: bfloat16 0.15%, float16 0.05% at most)."""
    frozen, lora, lcfg, ids = setup
    base = dict(steps=30, batch_size=8, learning_rate=2e-2, warmup_steps=3)
    lora32, losses32 = ft.finetune(frozen, lora, ids, CFG, ft.FinetuneConfig(**base), progress=False)
    lora16, losses16 = ft.finetune(frozen, lora, ids, CFG, ft.FinetuneConfig(**base, dtype=dtype, remat="block"),
                                   progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora16))
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
    assert np.mean(losses16[-5:]) < 0.9 * np.mean(losses16[:5])  # it learns (0.85 measured)


def test_bfloat16_step_memory_is_well_under_float32s():
    """Issue 9: the bfloat16 step needs at most 0.55x the float32 step's compiled memory
    (``benchmarks/memory.py finetune``, remat "block": 0.52x). On this small model 0.555x;
    0.666x when XLA's CPU backend held float32 copies of bfloat16 activations for the
    LoRA gradient products and two float32 results per quantized LoRA linear."""
    from apiq_jax.memory_plan import abstract_quantized_model, finetune_step_memory

    cfg = ModelConfig("LlamaForCausalLM", 256, 128, 352, 1, 2, 2, 64)
    total = {}
    for dtype in ("float32", "bfloat16"):
        frozen, lora = abstract_quantized_model(cfg, QuantConfig(bits=2, group_size=64), LoraConfig(rank=8, alpha=8),
                                                dtype)
        fc = ft.FinetuneConfig(batch_size=2, dtype=dtype, remat="block")
        total[dtype] = finetune_step_memory(cfg, frozen, lora, 2, 128, fc)["total"]
    assert total["bfloat16"] <= 0.61 * total["float32"]


def test_memmap_data_and_scan_checkpoints_resume_unrolled(setup, tmp_path, monkeypatch):
    """Memory-mapped ids train like in-memory ids; a checkpoint written by a scan (stacked)
    run is resumed by an unrolled run (checkpoints hold the "layers" list)."""
    frozen, lora, lcfg, ids = setup
    np.save(tmp_path / "ids.npy", ids)
    mm = np.load(tmp_path / "ids.npy", mmap_mode="r")
    cfg = ft.FinetuneConfig(steps=4, batch_size=4, learning_rate=1e-3, save_every=2, remat="block")
    a, la = ft.finetune(frozen, lora, mm, CFG, cfg, progress=False)
    b, lb = ft.finetune(frozen, lora, ids, CFG, cfg, progress=False)
    np.testing.assert_array_equal(la, lb)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not a.is_stacked and jax.tree.structure(a) == jax.tree.structure(lora)

    real = ft.batch_indices

    def crash_at_step_3(n, bs, step, seed):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(n, bs, step, seed)

    monkeypatch.setattr(ft, "batch_indices", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(frozen, lora, ids, CFG, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(ft, "batch_indices", real)
    unrolled = dataclasses.replace(cfg, remat="none")
    resumed, lr = ft.finetune(frozen, lora, ids, CFG, unrolled, checkpoint_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(lr[:2], la[:2])  # the first two steps come from the scan run's checkpoint
    np.testing.assert_allclose(lr, la, rtol=1e-5)
    assert _rel(resumed, a) <= 1e-5


def test_finetune_config_new_knobs():
    assert ft.FinetuneConfig().dtype == "float32" and ft.FinetuneConfig().remat == "none"
    assert not ft.FinetuneConfig().scans and ft.FinetuneConfig(remat="block").scans
    assert not ft.FinetuneConfig(remat="block", scan_layers=False).scans
    with pytest.raises(ValueError, match=r"dtype='float64' is not supported; accepted: \('float32', 'bfloat16', 'float16'\)"):
        ft.FinetuneConfig(dtype="float64")
    with pytest.raises(ValueError, match=r"remat='all' is not supported; accepted: \('none', 'block', 'dots', 'sqrt'\)"):
        ft.FinetuneConfig(remat="all")
    with pytest.raises(ValueError, match="grad_accum=3 must divide batch_size=8"):
        ft.FinetuneConfig(grad_accum=3)
    with pytest.raises(ValueError, match="grad_accum=0 must be a positive int"):
        ft.FinetuneConfig(grad_accum=0)
