"""Causal attention alone on the CPU: the fused C++ kernel beside XLA's paths and torch's SDPA.

For each shape (batch, tokens, key heads, query heads per key head, head_dim) it times the
forward pass and forward + backward (the gradient of ``sum(out * w)`` with respect to q, k, v) of

- ``fused``: :func:`apiq_jax.cpu_kernels.fused_attention` (what ``attention_impl="auto"`` runs on CPU);
- ``blocks``: the causal query blocks in XLA (the default before the kernel);
- ``plain``: all scores at once in XLA;
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (its CPU
  flash-attention kernel), GQA by ``enable_gqa``;

alternating, medians of ``--reps`` rounds after a warm-up.

    python benchmarks/attention.py [--reps 20] [--shapes 8x256x4x2x32,4x512x8x1x64,1x2048x8x4x128]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.cpu_kernels import attention as cpu_attention
from apiq_jax.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

SHAPES = "8x256x4x2x32,4x512x8x1x64,1x2048x8x4x128"


def jax_runs(shape: tuple[int, ...]) -> dict[str, object]:
    """Warmed-up jitted forward and forward+backward of each JAX path on random operands."""
    b, s, kvh, g, hd = shape
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((b, s, kvh, g, hd)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((b, s, kvh, hd)), jnp.float32) for _ in range(2))
    w = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
    mask = jnp.tril(jnp.ones((1, s, s), bool))
    paths = {"fused": cpu_attention.fused_attention, "blocks": llama._attend_causal_blocks, "plain": llama._attend}
    runs = {}
    for name, fn in paths.items():
        fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mask))
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) * w), (0, 1, 2)))
        jax.block_until_ready((fwd(q, k, v), grad(q, k, v)))
        runs[f"{name} fwd"] = lambda f=fwd: jax.block_until_ready(f(q, k, v))
        runs[f"{name} fwd+bwd"] = lambda f=grad: jax.block_until_ready(f(q, k, v))
    return runs


def torch_runs(shape: tuple[int, ...]) -> dict[str, object]:
    """Warmed-up SDPA forward (inference mode) and forward+backward in torch."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    b, s, kvh, g, hd = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, kvh * g, s, hd, generator=gen)
    k, v = (torch.randn(b, kvh, s, hd, generator=gen) for _ in range(2))
    w = torch.randn(b, kvh * g, s, hd, generator=gen)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.inference_mode():
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def grad():
        (sdpa(qg, kg, vg, is_causal=True, enable_gqa=True) * w).sum().backward()
        for x in (qg, kg, vg):
            x.grad = None

    fwd(), grad()
    return {"torch fwd": fwd, "torch fwd+bwd": grad}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated b x s x kvh x g x hd")
    args = ap.parse_args(argv)
    why = cpu_attention.unavailable_reason()
    if why:
        raise SystemExit(f"fused CPU attention unavailable: {why}")
    import torch

    shapes = [tuple(int(x) for x in spec.split("x")) for spec in args.shapes.split(",") if spec]
    print(f"CPU: {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}; float32, causal; "
          f"medians of {args.reps} alternating rounds")
    print()
    print("| b x s x kvh x g x hd | pass | fused ms | blocks (XLA) ms | plain (XLA) ms | torch SDPA ms "
          "| fused vs blocks | fused vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        med = interleaved_medians(jax_runs(shape) | torch_runs(shape), args.reps)
        for p in ("fwd", "fwd+bwd"):
            f, bl, pl, t = (1e3 * med[f"{n} {p}"] for n in ("fused", "blocks", "plain", "torch"))
            print(f"| {'x'.join(map(str, shape))} | {p} | {f:.2f} | {bl:.2f} | {pl:.2f} | {t:.2f} | {f / bl:.2f}x "
                  f"| {f / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
