"""Device memory of one ApiQ-bw block with the activation caches on the device vs offloaded to the host.

``apiq-jax quantize --offload-activations`` keeps the ``[nsamples, seqlen, hidden]`` caches in
host memory and sends one batch to the device per training step (and a chunk of samples per
pass of the block). This compares, from the compiled XLA programs (``jit(...).lower(abstract
shapes).compile().memory_analysis()``: argument + output + temp bytes; nothing is allocated),
what the device must hold for one block:

* ``device caches`` (the default, the baseline): the whole block optimisation as one
  program (:func:`apiq_jax.calibration.apiq_bw_core.train_block_bw`), its arguments holding
  the block in float32 and the three caches (``x_q``, ``t1``, ``t2``);
* ``offloaded``: the one-batch step (:func:`apiq_jax.calibration.apiq_bw_core.bw_batch_step`)
  and the block's pass over one chunk of samples, whichever is larger.

    python benchmarks/offload_memory.py [--shapes 4096x11008x32 8192x28672x64] [--nsamples 128] \
        [--seqlen 2048] [--cache-dtype bfloat16]

Shapes are HIDDENxMLPxHEADS (Llama-2-7B: 4096x11008x32; Llama-2-70B: 8192x28672x64 with 8 KV
heads). Prints a table and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp

from apiq_jax.calibration import ApiQOptions
from apiq_jax.calibration.adamw import make_optimizer
from apiq_jax.calibration.apiq_bw_core import bw_batch_step, train_block_bw
from apiq_jax.calibration.blocks import HOST_CHUNK_BYTES, _run_block_donating
from apiq_jax.lora import LINEARS, Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import layer_param_shapes, linear_shapes
from apiq_jax.quant import QuantConfig, init_clip

GiB = 2**30


def _total(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def block_memory(hidden: int, mlp: int, heads: int, kv_heads: int, nsamples: int, seqlen: int, cache_dtype: str,
                 rank: int = 64, bits: int = 2, group: int = 64) -> dict[str, float]:
    """Device GiB of one ApiQ-bw block with the caches on the device and offloaded.

    Args:
      hidden, mlp, heads, kv_heads: the block's sizes (head_dim = hidden / heads).
      nsamples, seqlen: the calibration set.
      cache_dtype: the caches' dtype.
      rank, bits, group: LoRA rank and the quantizer.

    Returns:
      ``{"device caches", "offloaded", "caches"}`` in GiB (``caches``: the three caches alone).
    """
    cfg = ModelConfig("LlamaForCausalLM", 32000, hidden, mlp, 1, heads, kv_heads, hidden // heads)
    qcfg = QuantConfig(bits=bits, group_size=group)
    lcfg = LoraConfig(rank=rank, alpha=float(rank))
    sds = jax.ShapeDtypeStruct
    shapes = linear_shapes(cfg)
    layer = {k: sds(v, jnp.float32) for k, v in layer_param_shapes(cfg).items()}
    lora = Lora({n: {"a": sds((shapes[n][1], rank), jnp.float32), "b": sds((rank, shapes[n][0]), jnp.float32)}
                 for n in lcfg.targets}, lcfg)
    train = {"clip": {n: jax.eval_shape(lambda s=shapes[n]: init_clip(s, qcfg)) for n in LINEARS}, "lora": lora}
    opts = ApiQOptions(epochs=1, batch_size=1)
    cache = sds((nsamples, seqlen, hidden), jnp.dtype(cache_dtype))
    whole = train_block_bw.lower(layer, train, cache, cache, cache, None, config=cfg, qcfg=qcfg, opts=opts).compile()
    state = jax.eval_shape(make_optimizer(opts).init, train)
    batch = sds((1, seqlen, hidden), jnp.dtype(cache_dtype))
    step = bw_batch_step.lower(train, state, (batch, batch, batch), layer, config=cfg, qcfg=qcfg, opts=opts,
                               layer_idx=None).compile()
    sample_bytes = seqlen * hidden * jnp.dtype(cache_dtype).itemsize
    chunk = sds((max(1, HOST_CHUNK_BYTES // sample_bytes), seqlen, hidden), jnp.dtype(cache_dtype))
    passes = _run_block_donating.lower(layer, chunk, cfg, None, layer_idx=None).compile()
    return {"device caches": _total(whole) / GiB, "offloaded": max(_total(step), _total(passes)) / GiB,
            "caches": 3 * math.prod(cache.shape) * jnp.dtype(cache_dtype).itemsize / GiB}


def main() -> None:
    """Print the table (and a JSON last line).

    Returns:
      None.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x11008x32x32", "8192x28672x64x8"],
                   help="HIDDENxMLPxHEADSxKV_HEADS blocks (default: Llama-2-7B's and Llama-2-70B's)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--cache-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args()
    rows = []
    print(f"ApiQ-bw, one block, {args.nsamples} x {args.seqlen} tokens, {args.cache_dtype} caches, rank 64, "
          "device GiB (argument + output + temp of the compiled programs)")
    print(f"{'block':>22} | {'3 caches':>8} | {'device caches':>13} | {'offloaded':>9} | ratio")
    for shape in args.shapes:
        hidden, mlp, heads, kv = (int(v) for v in shape.split("x"))
        r = block_memory(hidden, mlp, heads, kv, args.nsamples, args.seqlen, args.cache_dtype)
        rows.append({"shape": shape, **r})
        print(f"{shape:>22} | {r['caches']:8.2f} | {r['device caches']:13.2f} | {r['offloaded']:9.2f} | "
              f"{r['offloaded'] / r['device caches']:.2f}x")
    print(json.dumps({"nsamples": args.nsamples, "seqlen": args.seqlen, "cache_dtype": args.cache_dtype,
                      "rows": rows}))


if __name__ == "__main__":
    main()
