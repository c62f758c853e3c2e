"""Sharded finetuning on fake CPU devices: per-device memory by fsdp, and a correctness-run step rate.

    python benchmarks/sharding.py [--layers 8] [--reps 3] [--no-time]

Part 1 (memory): the finetuning step of a synthetic 2-bit Llama (hidden 1024, mlp 2816,
16 heads, vocab 32000, group 64, LoRA r=16 on all seven linears, batch 8 x 1024, remat
"block") compiled for meshes ``data=8/f, fsdp=f`` with f = 1, 2, 4, 8 on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set by this script). Per device:
the frozen-parameter bytes of the shards (from the placement rules on abstract shapes), the
argument bytes (parameters + LoRA + optimizer state + batch) and temporaries from
``compile().memory_analysis()``; beside them the one-device step (no mesh) as the baseline.
Nothing is allocated: the shapes are abstract.

Part 2 (steps/s): a small 2-bit model (4 layers x 256) finetuned for ``--reps`` steps on
1, 2, 4 and 8 fake devices (``data=n``). Fake CPU devices share the same cores, so this is
a check that the sharded program runs and agrees (its losses are printed), not a speed
claim.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from apiq_jax import sharding as S  # noqa: E402
from apiq_jax.lora import LoraConfig  # noqa: E402
from apiq_jax.memory_plan import abstract_quantized_model, finetune_step_memory  # noqa: E402
from apiq_jax.models import ModelConfig, init_params, quantize_model  # noqa: E402
from apiq_jax.models.llama import stack_layers  # noqa: E402
from apiq_jax.quant import QuantConfig  # noqa: E402
from apiq_jax.training import FinetuneConfig, finetune  # noqa: E402

GB = 1e9


def shard_bytes(tree, mesh) -> int:
    """Bytes of device 0's shards of an abstract ``tree`` placed by the rules on ``mesh``."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(S.tree_shardings(tree, mesh)), strict=True):
        shape = sh.shard_shape(leaf.shape)
        total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def memory_table(layers: int) -> list[dict]:
    cfg = ModelConfig("LlamaForCausalLM", 32000, 1024, 2816, layers, 16, 16, 64)
    frozen, lora = abstract_quantized_model(cfg, QuantConfig(bits=2, group_size=64), LoraConfig(rank=16, alpha=16.0))
    fc = FinetuneConfig(remat="block", batch_size=8)
    stacked = jax.eval_shape(stack_layers, frozen)
    rows = []
    one = finetune_step_memory(cfg, frozen, lora, 8, 1024, fc)
    whole = shard_bytes(stacked, S.make_mesh("data=1,fsdp=1", devices=jax.devices()[:1]))
    rows.append({"mesh": "one device (baseline)", "fsdp": 1, "params_gb": whole / GB,
                 "argument_gb": one["argument"] / GB, "temp_gb": one["temp"] / GB, "params_ratio": 1.0})
    for f in (1, 2, 4, 8):
        mesh = S.make_mesh(f"data={8 // f},fsdp={f}")
        mem = finetune_step_memory(cfg, frozen, lora, 8, 1024, fc, mesh=mesh)
        p = shard_bytes(stacked, mesh)
        rows.append({"mesh": f"data={8 // f},fsdp={f}", "fsdp": f, "params_gb": p / GB,
                     "argument_gb": mem["argument"] / GB, "temp_gb": mem["temp"] / GB,
                     "params_ratio": p / whole})
    return rows


def speed_table(reps: int) -> list[dict]:
    cfg = ModelConfig("LlamaForCausalLM", 512, 256, 768, 4, 8, 8, 32)
    frozen, lora = quantize_model(init_params(cfg, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=16, alpha=16.0), key=jax.random.key(1))
    ids = np.random.default_rng(0).integers(0, 512, (64, 256)).astype(np.int32)
    rows = []
    for n in (1, 2, 4, 8):
        mesh = None if n == 1 else S.make_mesh(f"data={n}", devices=jax.devices()[:n])
        fc = FinetuneConfig(steps=1, batch_size=8)
        finetune(frozen, lora, ids, cfg, fc, progress=False, mesh=mesh)  # compile
        fc = FinetuneConfig(steps=reps, batch_size=8)
        t = time.perf_counter()
        _, losses = finetune(frozen, lora, ids, cfg, fc, progress=False, mesh=mesh)
        dt = time.perf_counter() - t
        rows.append({"devices": n, "steps_per_s": reps / dt, "last_loss": losses[-1]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-time", action="store_true")
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices")
    mem = memory_table(args.layers)
    print(f"\nfinetuning step per device, {args.layers} layers x 1024, 2-bit, r16, batch 8 x 1024, remat block")
    print("| mesh | frozen params / device (GB) | ratio to one device | 1/fsdp | arguments (GB) | temporaries (GB) |")
    print("|---|---|---|---|---|---|")
    for r in mem:
        print(f"| {r['mesh']} | {r['params_gb']:.3f} | {r['params_ratio']:.3f} | {1 / r['fsdp']:.3f} | "
              f"{r['argument_gb']:.3f} | {r['temp_gb']:.3f} |")
    speed = [] if args.no_time else speed_table(args.reps)
    if speed:
        print("\nsteps/s on fake CPU devices sharing 2 cores (a correctness run, not a speed claim)")
        print("| devices (data=n) | steps/s | loss after the steps |")
        print("|---|---|---|")
        for r in speed:
            print(f"| {r['devices']} | {r['steps_per_s']:.2f} | {r['last_loss']:.5f} |")
    print(json.dumps({"memory": mem, "speed": speed}))


if __name__ == "__main__":
    main()
