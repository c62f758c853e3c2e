"""Forward-pass throughput: jitted JAX decoder vs transformers' PyTorch forward, same CPU, same run.

Rows: the stories260K checkpoint (skipped when absent) and a random 4-layer, 512-wide
Llama; each in float32 and bfloat16; batch 8 x 256 tokens by default. Both frameworks
run the same weights (the random model is written with ``save_pretrained`` and read by
transformers), and the table reports the max |logit difference| between them as a check.

    python benchmarks/forward.py [--stories DIR] [--batch 8] [--seqlen 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.models import ModelConfig, forward, init_params, load_pretrained, save_pretrained

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import add_model_arguments  # noqa: E402

forward_jit = jax.jit(forward, static_argnames="config")


def _time(fn: Any, reps: int) -> float:
    fn()  # warm-up (compilation for JAX)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_dir(path: Path, dtype: str, ids: np.ndarray, reps: int) -> dict[str, Any]:
    """Tokens/s of our jitted forward and of transformers on the HF directory ``path``."""
    import torch
    import transformers

    model = load_pretrained(path, dtype=dtype)
    params, cfg = model.params, model.config
    x = jnp.asarray(ids)

    def run_jax() -> Any:
        return forward_jit(params, None, x, cfg).block_until_ready()

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=tdtype).eval()
    tx = torch.tensor(ids, dtype=torch.long)

    def run_torch() -> Any:
        with torch.inference_mode():
            return hf(tx).logits

    t_jax = _time(run_jax, reps)
    t_torch = _time(run_torch, reps)
    diff = float(np.abs(np.asarray(run_jax(), np.float32) - run_torch().float().numpy()).max())
    n = ids.size
    return {"jax": n / t_jax, "torch": n / t_torch, "diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, reps=3, reps_help="timed repetitions (best is reported)",
                        stories_help="stories260K HF directory (row skipped when absent)",
                        vocab_help="vocab of the random Llama")
    args = parser.parse_args(argv)

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rand_cfg = ModelConfig(
            "LlamaForCausalLM", vocab_size=args.vocab, hidden_size=512, intermediate_size=1376,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
            rms_norm_eps=1e-5, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        )
        rand_dir = save_pretrained(init_params(rand_cfg, jax.random.key(0)), Path(tmp) / "rand", rand_cfg)
        models = []
        if (args.stories / "config.json").is_file():
            models.append(("stories260K", args.stories))
        else:
            print(f"# stories260K not found at {args.stories}: row skipped")
        models.append(("llama 4x512 (random)", rand_dir))
        for name, path in models:
            vocab = 512 if name == "stories260K" else args.vocab
            ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seqlen)).astype(np.int32)
            for dtype in ("float32", "bfloat16"):
                r = bench_dir(path, dtype, ids, args.reps)
                rows.append((name, dtype, r))

    print()
    print(f"CPU: {os.cpu_count()} cores visible, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); batch {args.batch} x {args.seqlen} tokens, "
          f"best of {args.reps}")
    header = f"| {'model':<22} | {'dtype':<8} | {'JAX tok/s':>10} | {'torch tok/s':>11} | {'JAX/torch':>9} | {'max abs dlogit':>14} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, dtype, r in rows:
        print(f"| {name:<22} | {dtype:<8} | {r['jax']:>10.0f} | {r['torch']:>11.0f} | "
              f"{r['jax'] / r['torch']:>8.2f}x | {r['diff']:>14.2e} |")


if __name__ == "__main__":
    main()
