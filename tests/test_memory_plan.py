"""Expected memory from shapes (apiq_jax/memory_plan.py), checked against real arrays and compiled steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.lora import LINEARS, LoraConfig
from apiq_jax.memory_plan import (
    QuantizePlanInputs,
    abstract_quantized_model,
    clip_layer_bytes,
    finetune_step_memory,
    lora_layer_bytes,
    packed_layer_bytes,
    plan_finetune,
    plan_quantize,
)
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params
from apiq_jax.models.quantized import quantize_model
from apiq_jax.quant import QuantConfig, init_clip
from apiq_jax.training import FinetuneConfig

CFG = ModelConfig("LlamaForCausalLM", 64, 64, 160, 2, 4, 2, 16)
QCFG = QuantConfig(bits=2, group_size=32)
LCFG = LoraConfig(rank=4, alpha=8)


def _nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_layer_sizes_equal_the_real_arrays():
    params = init_params(CFG, jax.random.key(0))
    frozen, lora = quantize_model(params, QCFG, LCFG, key=jax.random.key(1))
    assert packed_layer_bytes(CFG, QCFG) == _nbytes([frozen["layers"][0][n] for n in LINEARS])
    assert lora_layer_bytes(CFG, LCFG) == _nbytes(lora["layers"][0].factors)
    clips = [init_clip(params["layers"][0][n].shape, QCFG) for n in LINEARS]
    assert clip_layer_bytes(CFG, QCFG) == _nbytes(clips)


def test_abstract_model_has_the_shapes_of_a_real_one():
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QCFG, LCFG, key=jax.random.key(1))
    abstract = abstract_quantized_model(CFG, QCFG, LCFG)
    real = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), (frozen, lora))
    assert jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), abstract) == real


def test_finetune_plan_is_the_compiled_step_of_real_arrays():
    """The plan compiles abstract shapes; compiling the same step on real arrays gives the same memory."""
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QCFG, LCFG, key=jax.random.key(1))
    fc = FinetuneConfig(batch_size=2, remat="block")
    real = finetune_step_memory(CFG, frozen, lora, 2, 16, fc)
    plan = plan_finetune(CFG, QCFG, LCFG, 2, 16, fc)
    assert plan.peak_bytes == real["total"] > 0
    # the old behaviour needs more (whole attention and logits, no remat)
    assert finetune_step_memory(CFG, frozen, lora, 2, 16, FinetuneConfig(batch_size=2), baseline=True)["total"] > 0


def test_quantize_plan_parts_scale_with_the_shapes():
    def plan(**kw):
        args = dict(method="apiq-bw", quant_config=QCFG, lora_config=LCFG, nsamples=4, seqlen=16, dtype="float32")
        return plan_quantize(CFG, QuantizePlanInputs(**{**args, **kw}), runtime=0, compiled=0)

    base = plan()
    assert base.parts["activation caches"] == 3 * 4 * 16 * CFG.hidden_size * 4  # x_fp/t1, x_q, t2 in float32
    assert plan(cache_dtype="bfloat16").parts["activation caches"] == base.parts["activation caches"] // 2
    assert plan(nsamples=8).parts["activation caches"] == 2 * base.parts["activation caches"]
    assert base.parts["block program temporaries"] > 0
    # ApiQ: finished blocks' LoRA and clip logits wait in the work directory, only the packed layers stay
    assert base.parts["packed layers so far"] == (CFG.num_hidden_layers - 1) * packed_layer_bytes(CFG, QCFG)
    rtn = plan(method="rtn")
    assert rtn.parts["packed layers, LoRA so far"] == (CFG.num_hidden_layers - 1) * (
        packed_layer_bytes(CFG, QCFG) + lora_layer_bytes(CFG, LCFG))
    assert "activation caches" in rtn.parts and rtn.parts["activation caches"] == 2 * 4 * 16 * CFG.hidden_size * 4


def test_saving_peaks_for_a_big_vocabulary_and_counts_reading_a_table():
    big_vocab = ModelConfig("LlamaForCausalLM", 200_000, 64, 160, 2, 4, 2, 16)
    plan = plan_quantize(big_vocab, QuantizePlanInputs(method="apiq-bw", quant_config=QCFG, lora_config=LCFG,
                                                       nsamples=4, seqlen=16, dtype="float16"), runtime=0, compiled=0)
    table = 200_000 * 64 * 2
    assert plan.phase == "saving" and plan.parts["embeddings and head"] == 2 * table
    assert plan.parts["reading a table (mapped file pages, host copy)"] == 2 * table


def test_offloaded_plan_keeps_the_caches_on_the_host_and_one_batch_on_the_device():
    def plan(**kw):
        args = dict(method="apiq-bw", quant_config=QCFG, lora_config=LCFG, nsamples=8, seqlen=16, dtype="float32",
                    offload_activations=True)
        return plan_quantize(CFG, QuantizePlanInputs(**{**args, **kw}), runtime=0, compiled=0)

    off, on_device = plan(), plan(offload_activations=False)
    assert off.parts["activation caches (host)"] == on_device.parts["activation caches"]
    assert off.parts["one batch of the caches"] == 3 * 16 * CFG.hidden_size * 4  # batch_size 1
    assert off.host_only_bytes == off.parts["activation caches (host)"] and on_device.host_only_bytes == 0
    assert off.to_dict()["device_gib"] == round((off.peak_bytes - off.host_only_bytes) / 2**30, 3)
    # the one-batch step's temporaries do not grow with the calibration set; the whole-block program's do
    assert plan(nsamples=32).parts["block program temporaries"] == off.parts["block program temporaries"]
    assert (plan(nsamples=32, offload_activations=False).parts["block program temporaries"]
            > on_device.parts["block program temporaries"])


def test_quantize_plan_holds_the_block_as_calibration_reads_it():
    """ApiQ reads each tensor straight to float32 (no storage-dtype copy); the baselines read the block as stored."""
    from apiq_jax.models.llama import layer_param_shapes, linear_shapes

    block = sum(int(np.prod(s)) for s in layer_param_shapes(CFG).values())
    inputs = dict(quant_config=QCFG, lora_config=LCFG, nsamples=4, seqlen=16, dtype="float16")
    apiq = plan_quantize(CFG, QuantizePlanInputs(method="apiq-bw", **inputs), runtime=0, compiled=0)
    assert apiq.parts["block (float32)"] == 4 * block
    assert not any("storage dtype" in part for part in apiq.parts)
    rtn = plan_quantize(CFG, QuantizePlanInputs(method="rtn", **inputs), runtime=0, compiled=0)
    assert rtn.parts["block (storage dtype)"] == 2 * block and "block (float32)" not in rtn.parts
    assert rtn.parts["largest linear (float32)"] == 4 * max(int(np.prod(s)) for s in linear_shapes(CFG).values())


def test_quantize_plan_runtime_is_what_quantize_imports_and_compiles():
    """The runtime is this process after quantize's imports (transformers, torch); the block programs are compiled."""
    import sys

    from apiq_jax.memory_plan import compile_block_programs, resident_bytes

    inputs = QuantizePlanInputs(method="apiq-bw", quant_config=QCFG, lora_config=LCFG, nsamples=4, seqlen=16,
                                dtype="float32")
    plan = plan_quantize(CFG, inputs)
    assert "transformers" in sys.modules and "torch" in sys.modules
    assert 0 < plan.parts["runtime"] <= resident_bytes() * 1.5
    assert plan.parts["compiled block programs"] >= 0
    assert list(plan.parts)[:2] == ["runtime", "compiled block programs"]
    temp, kept = compile_block_programs(CFG, inputs)
    assert temp == plan.parts["block program temporaries"] > 0 and kept >= 0
    assert plan.peak_bytes == sum(plan.parts.values())


@pytest.mark.parametrize("argv,message", [
    (["--method", "awq"], "--method 'awq' is not supported"),
    (["--bits", "7"], "--bits 7 is not supported"),
    (["--nsamples", "0"], "--nsamples 0 must be a positive integer"),
])
def test_plan_command_errors(tmp_path, capsys, argv, message):
    from apiq_jax.cli import main
    from apiq_jax.demo_data import DEMO_MODEL_DIR

    args = ["plan", "--model", str(DEMO_MODEL_DIR), "--method", "apiq-bw", "--bits", "2"]
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plan_command_prints_both_jobs(capsys):
    import json

    from apiq_jax.cli import main
    from apiq_jax.demo_data import DEMO_MODEL_DIR

    assert main(["plan", "--model", str(DEMO_MODEL_DIR / "config.json"), "--method", "rtn", "--bits", "2",
                 "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--rank", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["quantize"]["peak_gib"] > 0 and out["finetune"]["peak_gib"] > 0 and out["dtype"] == "float32"
