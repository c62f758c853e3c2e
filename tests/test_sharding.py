"""apiq_jax.sharding on one device: the mesh spec, the placement rules of every tree, batches.

The rules are checked from shapes alone (``tree_specs`` takes the fsdp size), so they run
without several devices; tests/multidevice/ runs the sharded programs on 8 CPU devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from apiq_jax import sharding as S
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model, stack_layers
from apiq_jax.quant import QuantConfig

P = PartitionSpec
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=172,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def model():
    return quantize_model(init_params(CFG, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                          LoraConfig(rank=4), key=jax.random.key(1))


def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    assert S.parse_mesh_spec(" fsdp=8 ") == {"fsdp": 8}


@pytest.mark.parametrize("spec, fragment", [
    ("tensor=2", "axis=size"), ("data=2,data=2", "given twice"), ("data=0", "positive int"),
    ("data=x", "positive int"), ("data", "axis=size"),
])
def test_parse_mesh_spec_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        S.parse_mesh_spec(spec)


def test_make_mesh_default_and_fill():
    mesh = S.make_mesh()
    assert mesh.axis_names == S.AXES and mesh.shape["data"] == jax.device_count() and mesh.shape["fsdp"] == 1
    assert dict(S.make_mesh("fsdp=1").shape) == {"data": jax.device_count(), "fsdp": 1}


def test_make_mesh_wrong_device_count():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {2 * n} devices, but {n} are available"):
        S.make_mesh(f"data={n},fsdp=2")


def test_dense_params_split_along_output_then_input(model):
    dense = init_params(CFG, jax.random.key(0))
    specs = S.tree_specs(dense, 4)
    layer = specs["layers"][0]
    assert layer["q_proj"] == P("fsdp", None)          # [64, 64]: output dimension
    assert layer["gate_proj"] == P("fsdp", None)       # [172, 64]: 172 = 4 * 43
    assert S.tree_specs(dense, 8)["layers"][0]["gate_proj"] == P(None, "fsdp")  # 172 % 8: the input one
    assert layer["input_layernorm"] == P(None)          # norms replicated
    assert specs["embed_tokens"] == P("fsdp", None)     # vocabulary
    assert S.tree_specs(dense, 128)["layers"][0]["q_proj"] == P(None, None)  # nothing divisible: replicated


def test_quantized_and_stacked_split_along_output(model):
    frozen, _ = model
    q = S.tree_specs(frozen, 2)["layers"][0]["q_proj"]
    assert q.codes == P("fsdp", None) and q.scales == P("fsdp", None)
    stacked = S.tree_specs(stack_layers(frozen), 2)["layers"]
    assert stacked["q_proj"].codes == P(None, "fsdp", None)   # [L, N, words]: the layer axis stays whole
    assert stacked["input_layernorm"] == P(None, None)   # [L, D] norms replicated, the layer axis never split


def test_lora_and_optimizer_state_follow_the_base(model):
    _, lora = model
    spec = S.tree_specs(lora, 4)["layers"][0]["down_proj"]
    assert spec.a == P("fsdp", None) and spec.b == P(None, "fsdp")   # a [in, r], b [r, out]
    state = S.tree_specs(optax.adamw(1e-3).init(lora), 4)
    adam = state[0]
    assert adam.mu["layers"][1]["v_proj"].b == P(None, "fsdp") and adam.count == P()


def test_batch_spec():
    assert S.batch_spec(AbstractMesh((2, 4), S.AXES), 8) == P(("data", "fsdp"))
    assert S.batch_spec(AbstractMesh((2, 4), S.AXES), 6) == P("data")
    with pytest.raises(ValueError, match="batch size 3 must be a multiple of the mesh's data axis"):
        S.batch_spec(AbstractMesh((2, 4), S.AXES), 3)


def test_place_and_place_batch_on_one_device(model):
    mesh = S.make_mesh(devices=jax.devices()[:1])
    frozen, lora = model
    placed = S.place({"frozen": frozen, "lora": lora}, mesh)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), placed, {"frozen": frozen, "lora": lora}))
    batch = S.place_batch(jnp.arange(12).reshape(4, 3), mesh)
    assert batch.sharding.spec == P(("data", "fsdp")) and batch.tolist() == jnp.arange(12).reshape(4, 3).tolist()


def test_initialize_distributed_arguments():
    assert S.initialize_distributed() is False
    with pytest.raises(ValueError, match="must be given together"):
        S.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(ValueError, match=r"--process-id 2 must be in \[0, --num-processes 2\)"):
        S.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        S.initialize_distributed("localhost", 2, 0)


def test_on_primary_in_one_process():
    calls = []
    assert S.is_primary()
    assert S.on_primary(lambda: calls.append(1) or "done", "write") == "done" and calls == [1]
    with pytest.raises(ValueError, match="boom"):   # process 0's own error reaches its caller
        S.on_primary(lambda: (_ for _ in ()).throw(ValueError("boom")), "write")


def test_placement_mesh_only_for_fsdp_or_processes():
    assert S.placement_mesh() is None                              # no mesh set
    with jax.set_mesh(S.make_mesh("data=1,fsdp=1")):
        assert S.placement_mesh() is None                          # one process, nothing split over fsdp
