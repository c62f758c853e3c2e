"""Sharded finetuning (apiq_jax.training with a mesh) equals one device, with parameters really split."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from apiq_jax import sharding as S
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig, finetune

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
#: relative tolerance of a LoRA leaf: ||sharded - single||_F / ||single||_F (float32; the
#: sharded gradients are summed in another order, Adam divides by their running RMS)
RTOL = 1e-5


@pytest.fixture(scope="module")
def model():
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=4), key=jax.random.key(1))
    # both factors nonzero, so every factor gets a gradient from step 1
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape), lora)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (16, 32), 0, CFG.vocab_size))
    return frozen, lora, ids


def _max_rel(out, ref):
    return max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))


@pytest.mark.parametrize("remat", ["none", "block"])
def test_meshes_equal_one_device(model, remat):
    frozen, lora, ids = model
    cfg = FinetuneConfig(steps=5, batch_size=8, learning_rate=1e-3, remat=remat)
    ref, ref_losses = finetune(frozen, lora, ids, CFG, cfg, progress=False)
    for spec in ("data=8,fsdp=1", "data=4,fsdp=2", "data=2,fsdp=4", "data=1,fsdp=8"):
        out, losses = finetune(frozen, lora, ids, CFG, cfg, progress=False, mesh=S.make_mesh(spec))
        np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=spec)
        assert _max_rel(out, ref) <= RTOL, spec
        fsdp = int(spec.split("fsdp=")[1])
        b = out["layers"][0]["q_proj"].b            # [r, out] split along out
        assert b.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        assert {s.data.shape for s in b.addressable_shards} == {(4, 64 // fsdp)}


def test_grad_accum_on_a_mesh(model):
    frozen, lora, ids = model
    cfg = FinetuneConfig(steps=3, batch_size=16, learning_rate=1e-3, grad_accum=2)
    ref, ref_losses = finetune(frozen, lora, ids, CFG, cfg, progress=False)
    out, losses = finetune(frozen, lora, ids, CFG, cfg, progress=False, mesh=S.make_mesh("data=4,fsdp=2"))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert _max_rel(out, ref) <= RTOL


def test_parameters_and_optimizer_state_are_partitioned(model):
    frozen, lora, _ = model
    mesh = S.make_mesh("data=2,fsdp=4")
    placed = S.place(frozen, mesh)
    q = placed["layers"][1]["q_proj"]
    assert {s.data.shape for s in q.codes.addressable_shards} == {(64 // 4, q.codes.shape[1])}
    assert {s.data.shape for s in placed["embed_tokens"].addressable_shards} == {(64 // 4, 64)}
    import optax
    state = S.place(optax.adamw(1e-3).init(lora), mesh)
    mu = state[0].mu["layers"][0]["up_proj"]
    assert {s.data.shape for s in mu.a.addressable_shards} == {(64 // 4, 4)}   # a [in=64, r]


def test_batch_not_divisible_by_data_axis(model):
    frozen, lora, ids = model
    with pytest.raises(ValueError, match="batch size 4 must be a multiple of the mesh's data axis \\(8\\)"):
        finetune(frozen, lora, ids, CFG, FinetuneConfig(steps=1, batch_size=4), progress=False,
                 mesh=S.make_mesh("data=8"))
