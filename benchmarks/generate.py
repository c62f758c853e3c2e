"""Decode speed of ``apiq_jax.generate`` (KV cache, jitted decode step) beside transformers' ``generate``.

For each model and batch size (1 and 8, prompts of ``--prompt-len`` tokens, ``--new-tokens`` greedy
tokens, no early stop) it times, after one warm-up call each:

* apiq-jax on the dense float32 weights;
* apiq-jax on the 2-bit packed form of the same weights (RTN, group 64, no LoRA; the decode
  step's linears run through ``qmatmul``);
* transformers' ``generate`` (PyTorch, float32, its dynamic KV cache) on the same dense weights, at
  the faster of 1 and all-CPU torch threads (on a loaded 2-core machine torch's 2-thread
  pool can be an order of magnitude slower than 1 thread for these small matmuls).

Decode tokens/s = batch * (new tokens - 1) / decode seconds (the prefill excluded: apiq-jax
reports it apart; for transformers it is the time of ``generate`` with N tokens minus that
with 1). Median of ``--repeats`` runs; a markdown table is printed.

    python benchmarks/generate.py [--new-tokens 64] [--prompt-len 32] [--repeats 3] [--shared DIR]

Models: the bundled demo model, and stories260K from ``--shared`` (default ``$APIQ_SHARED`` or
``../shared``) when present.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _apiq_rate(params, config, prompts, new_tokens, repeats) -> float:
    from apiq_jax.generation import generate

    generate(params, None, prompts, config, max_new_tokens=new_tokens)  # compile
    rates = []
    for _ in range(repeats):
        res = generate(params, None, prompts, config, max_new_tokens=new_tokens)
        rates.append(len(prompts) * (res.tokens.shape[1] - 1) / res.decode_seconds)
    return statistics.median(rates)


def _torch_rate(model_dir, prompts, new_tokens, repeats) -> tuple[float, int]:
    """transformers' decode tokens/s at its best torch thread count (1 or all CPUs) and that count."""
    import torch

    best = (0.0, 1)
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        best = max(best, (_torch_rate_at(model_dir, prompts, new_tokens, repeats), threads))
    return best


def _torch_rate_at(model_dir, prompts, new_tokens, repeats) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    run(new_tokens)  # warm-up
    rates = []
    for _ in range(repeats):
        decode = run(new_tokens) - run(1)
        rates.append(len(prompts) * (new_tokens - 1) / decode)
    return statistics.median(rates)


def main() -> None:
    """Run the benchmark and print the table.

    Returns:
        None.
    """
    import jax
    import torch
    import transformers

    from apiq_jax.demo_data import DEMO_MODEL_DIR
    from apiq_jax.lora import LoraConfig
    from apiq_jax.models import load_pretrained, quantize_model
    from apiq_jax.quant import QuantConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shared", default=os.environ.get("APIQ_SHARED", str(REPO.parent / "shared")))
    args = ap.parse_args()
    models = [("demo model", Path(DEMO_MODEL_DIR))]
    stories = Path(args.shared) / "models" / "stories260K"
    if stories.is_dir():
        models.append(("stories260K", stories))
    rng = np.random.default_rng(0)
    rows = []
    for label, d in models:
        model = load_pretrained(d, dtype="float32")
        cfg = model.config
        frozen, _ = quantize_model(model.params, QuantConfig(bits=2, group_size=64), LoraConfig(rank=4),
                                   key=jax.random.key(0))
        for batch in (1, 8):
            prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
            dense = _apiq_rate(model.params, cfg, prompts, args.new_tokens, args.repeats)
            packed = _apiq_rate(frozen, cfg, prompts, args.new_tokens, args.repeats)
            ref, threads = _torch_rate(d, prompts, args.new_tokens, args.repeats)
            rows.append((label, batch, dense, packed, ref, threads))
            print(f"{label} batch {batch}: dense {dense:.0f}, 2-bit {packed:.0f}, transformers {ref:.0f} tok/s "
                  f"({threads} torch threads)", flush=True)
    print(f"\njax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| model | batch | apiq-jax dense fp32 | apiq-jax 2-bit packed | transformers generate (dense fp32) |"
          " apiq-jax dense / transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, batch, dense, packed, ref, threads in rows:
        print(f"| {label} | {batch} | {dense:.0f} tok/s | {packed:.0f} tok/s | {ref:.0f} tok/s ({threads} thread"
              f"{'s' if threads > 1 else ''}) | {dense / ref:.2f}x |")


if __name__ == "__main__":
    main()
