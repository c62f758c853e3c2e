"""Memory of apiq-jax's jobs, measured from the compiled XLA programs (no weights allocated).

One subcommand per section; each prints a table and a JSON last line:

    python benchmarks/memory.py finetune [--layers 8 16] [--reps 5] [--no-time]

``finetune``: compiled memory (``jax.jit(step).lower(...).compile().memory_analysis()``:
temp + argument + output bytes) of one LoRA finetuning step (forward, backward, AdamW
update) on a synthetic 2-bit model (hidden 1024, mlp 2816, 16 heads of 64, vocab 32000,
group 64, LoRA r=16 on all seven linears), for the old behaviour (the baseline) and the
memory options, side by side. The baseline is the step with the new code's options set
to the old behaviour: layers unrolled, no remat, float32, plain ``[B, H, S, S]``
attention, logits and loss over the whole ``[B, S, V]`` at once. (One thing is not
optional any more: the XLA quantized matmul's backward keeps no dense weight; it did
not change the baseline's figure, 11.9 GB at 8 layers as measured on the old code.)
The shapes are abstract (``jax.ShapeDtypeStruct``, ``jax.eval_shape``): nothing but the
compiler runs. Then the median step time of two small models (stories260K-like and
6 layers x 256, batch 8 x 256) for each memory setting, which is what the defaults of
``--remat`` (and of scanning the layers) rest on.

To add a section (e.g. ``quantize``): write ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> dict`` below and register them in :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax import training as T
from apiq_jax.lora import LoraConfig
from apiq_jax.memory_plan import abstract_quantized_model, finetune_step_memory
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.models.llama import cast_params, stack_layers
from apiq_jax.quant import QuantConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import interleaved_medians  # noqa: E402

GB = 1e9
#: the figures of issue 9 (finetuning part)
TARGETS = {"8 layers, 4 x 1024 (GB)": 3.0, "16 / 8 layers": 1.15, "bfloat16 / float32": 0.55,
           "1 x 4096, 8 layers (GB)": 4.0}


# --- shared helpers -----------------------------------------------------------------------------
def synthetic_model(layers: int, *, dtype: str = "float32", hidden: int = 1024, mlp: int = 2816, heads: int = 16,
                    vocab: int = 32000, bits: int = 2, group: int = 64, rank: int = 16) -> tuple[Any, Any, Any]:
    """Abstract ``(config, frozen, lora)`` of a quantized Llama (:func:`apiq_jax.memory_plan.abstract_quantized_model`).

    Args:
      layers: decoder layers.
      dtype: dtype of the embeddings, norms and dequantized weights.
      hidden, mlp, heads, vocab: sizes (head_dim = hidden / heads, no grouped-query attention).
      bits, group: the quantizer of the seven linears.
      rank: LoRA rank on all seven linears (alpha = rank).

    Returns:
      ``(ModelConfig, frozen, lora)`` whose leaves are ``jax.ShapeDtypeStruct``.
    """
    cfg = ModelConfig("LlamaForCausalLM", vocab, hidden, mlp, layers, heads, heads, hidden // heads)
    frozen, lora = abstract_quantized_model(cfg, QuantConfig(bits=bits, group_size=group),
                                            LoraConfig(rank=rank, alpha=float(rank)), dtype)
    return cfg, frozen, lora


def step_memory(cfg: Any, frozen: Any, lora: Any, batch: int, seqlen: int, fc: T.FinetuneConfig, *,
                baseline: bool = False) -> dict[str, float]:
    """Compiled memory (GB) of one finetuning step (:func:`apiq_jax.memory_plan.finetune_step_memory`).

    Args:
      cfg, frozen, lora: from :func:`synthetic_model`.
      batch, seqlen: the step's token ids ``[batch, seqlen]``.
      fc: dtype, remat, grad_accum, scan_layers (as ``finetune`` runs it).
      baseline: the old behaviour (``fc`` should then say remat "none" and float32).

    Returns:
      ``{"temp", "argument", "output", "total"}`` in GB, and the compile seconds.
    """
    t = time.perf_counter()
    mem = finetune_step_memory(cfg, frozen, lora, batch, seqlen, fc, baseline=baseline)
    out: dict[str, float] = {k: v / GB for k, v in mem.items()}
    out["compile_s"] = time.perf_counter() - t
    return out


# --- finetune -----------------------------------------------------------------------------------
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the ``finetune`` section.

    Args:
      p: the subcommand's parser.

    Returns:
      None.
    """
    p.add_argument("--layers", type=int, nargs=2, default=(8, 16), metavar=("FEW", "MANY"),
                   help="the two depths compared (default 8 16)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per setting on the small model (default 5)")
    p.add_argument("--no-time", action="store_true", help="skip the small-model step times")
    p.add_argument("--no-memory", action="store_true", help="only the small-model step times")


def _finetune_rows(few: int, many: int) -> list[tuple[str, int, int, int, str]]:
    return [(f"{few} layers, 4 x 1024, float32", few, 4, 1024, "float32"),
            (f"{many} layers, 4 x 1024, float32", many, 4, 1024, "float32"),
            (f"{few} layers, 4 x 1024, bfloat16", few, 4, 1024, "bfloat16"),
            (f"{many} layers, 4 x 1024, bfloat16", many, 4, 1024, "bfloat16"),
            (f"{few} layers, 1 x 4096, float32", few, 1, 4096, "float32")]


SETTINGS = {  # column -> (FinetuneConfig kwargs, baseline)
    "baseline": ({"remat": "none"}, True),
    "none": ({"remat": "none"}, False),
    "block": ({"remat": "block"}, False),
    "sqrt": ({"remat": "sqrt"}, False),
}


#: the small models of the step-time table: name -> (config, batch, seqlen)
SMALL_MODELS = {
    "stories260K-like (5 x 64, vocab 512)": (
        ModelConfig("LlamaForCausalLM", 512, 64, 172, 5, 8, 4, 8, tie_word_embeddings=True), 8, 256),
    "6 layers x 256 (vocab 512)": (ModelConfig("LlamaForCausalLM", 512, 256, 768, 6, 8, 8, 32), 8, 256),
}


def _time_small(config: ModelConfig, batch: int, seqlen: int, reps: int) -> dict[str, float]:
    """Median step time (ms) of a small 2-bit model per memory setting, the settings interleaved."""
    frozen, lora = quantize_model(init_params(config, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=16, alpha=16), key=jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seqlen)), jnp.int32)
    runs: dict[str, Callable[[], Any]] = {}
    settings = {"baseline (old step)": (T.FinetuneConfig(), True),
                "none (unrolled, default)": (T.FinetuneConfig(), False),
                "none, scanned": (T.FinetuneConfig(scan_layers=True), False),
                "block (scanned)": (T.FinetuneConfig(remat="block"), False),
                "dots (scanned)": (T.FinetuneConfig(remat="dots"), False),
                "sqrt (scanned)": (T.FinetuneConfig(remat="sqrt"), False),
                "block, bfloat16": (T.FinetuneConfig(remat="block", dtype="bfloat16"), False)}
    for name, (fc, baseline) in settings.items():
        fc = dataclasses.replace(fc, batch_size=batch)
        opt = T.make_optimizer(fc)
        loss = (lambda f, lo, i: T.causal_lm_loss(f, lo, i, config, backend="xla", attention_impl="plain",
                                                  chunk_tokens=10**9)) if baseline else None
        step = T.make_train_step(config, opt, loss, backend="xla", finetune_config=fc)
        f = cast_params(frozen, fc.dtype)
        f, lo = (stack_layers(f), lora.stack_layers()) if fc.scans and not baseline else (f, lora)
        state = opt.init(lo)

        def run(step=step, f=f, lo=lo, state=state) -> Any:
            return jax.block_until_ready(step(f, lo, state, ids))

        run()  # compile
        runs[name] = run
    return {name: 1e3 * sec for name, sec in interleaved_medians(runs, reps).items()}


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """The ``finetune`` section: the compiled-memory table, the figures, the step times.

    Args:
      args: parsed arguments of :func:`add_finetune_arguments`.

    Returns:
      The results (also printed as tables).
    """
    result: dict[str, Any] = {}
    if not args.no_memory:
        result.update(_memory_table(*args.layers))
    if not args.no_time:
        print(f"\nsmall 2-bit models, LoRA r=16, CPU step time in ms (median of {args.reps}, settings interleaved)")
        times = {name: _time_small(cfg, b, s, args.reps) for name, (cfg, b, s) in SMALL_MODELS.items()}
        print(f"{'setting':28s} " + " ".join(f"{name:>38s}" for name in times))
        for setting in next(iter(times.values())):
            print(f"{setting:28s} " + " ".join(f"{t[setting]:38.1f}" for t in times.values()))
        result["small_step_ms"] = times
    return result


def _memory_table(few: int, many: int) -> dict[str, Any]:
    print(f"finetuning step, compiled memory in GB (temp + argument + output), jax {jax.__version__} on "
          f"{jax.devices()[0].platform}")
    print("synthetic 2-bit model: hidden 1024, mlp 2816, 16 heads x 64, vocab 32000, group 64, LoRA r=16 x 7 linears")
    head = f"{'shape':34s} " + " ".join(f"{c:>26s}" for c in SETTINGS)
    print(head + "\n" + " " * 35 + " ".join(f"{'temp  arg  out  total':>26s}" for _ in SETTINGS))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label, layers, batch, seqlen, dtype in _finetune_rows(few, many):
        cfg, frozen, lora = synthetic_model(layers, dtype=dtype)
        row: dict[str, dict[str, float]] = {}
        for col, (kw, baseline) in SETTINGS.items():
            if baseline and dtype != "float32":  # the old behaviour computed in float32
                continue
            fc = T.FinetuneConfig(batch_size=batch, dtype=dtype, **kw)
            row[col] = step_memory(cfg, frozen, lora, batch, seqlen, fc, baseline=baseline)
        table[label] = row
        cells = [(f"{r['temp']:5.2f}{r['argument']:5.2f}{r['output']:5.2f}{r['total']:7.2f}" if (r := row.get(c))
                  else f"{'-':>26s}") for c in SETTINGS]
        print(f"{label:34s} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
    f32, f32m, b16 = (table[r[0]] for r in _finetune_rows(few, many)[:3])
    long = table[_finetune_rows(few, many)[4][0]]
    figures = {}
    print("\nfigures (issue 9)                  target " + " ".join(f"{c:>10s}" for c in SETTINGS))
    for name, target, get in [
        (f"{few} layers, 4 x 1024 (GB)", 3.0, lambda c: f32[c]["total"]),
        (f"{many} / {few} layers", 1.15, lambda c: f32m[c]["total"] / f32[c]["total"]),
        ("bfloat16 / float32", 0.55, lambda c: b16[c]["total"] / f32[c]["total"]),
        (f"1 x 4096, {few} layers (GB)", 4.0, lambda c: long[c]["total"]),
    ]:
        vals = {c: get(c) for c in SETTINGS if c in f32 and c in b16 and c in long and c in f32m}
        figures[name] = vals
        print(f"{name:34s} {target:6.2f} " + " ".join(
            f"{vals[c]:8.3f}{'ok' if vals[c] <= target else ' x'}" if c in vals else f"{'-':>10s}" for c in SETTINGS))
    return {"memory_gb": table, "figures": figures}


#: section name -> (add its arguments, run it); add new sections here
SECTIONS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "finetune": (add_finetune_arguments, run_finetune),
}


def main(argv: list[str] | None = None) -> int:
    """Run one section of the memory benchmark.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="section", required=True, metavar="SECTION")
    for name, (add, _) in SECTIONS.items():
        add(sub.add_parser(name, help=f"the {name} section"))
    args = parser.parse_args(argv)
    result = SECTIONS[args.section][1](args)
    print(json.dumps({"section": args.section, **result}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
