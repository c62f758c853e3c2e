"""Storage cost and speed of the quantizers.

Prints two tables:
1. bits per parameter (every stored bit: packed codes, scales, zeros, nested constants)
   for 2/3/4/8-bit asym, sym and NF at group 64, with and without double quantization,
   next to bitsandbytes' NF4 + double-quant figure (4.127).
2. quantize+dequantize throughput on a 4096 x 4096 fp32 matrix on CPU (jitted) against a
   plain numpy implementation of the same formulas, measured in the same run.

Usage: python benchmarks/quant_storage.py [--size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.quant import QuantConfig, bits_per_param, dequantize, quantize


def numpy_quant_dequant(w: np.ndarray, bits: int, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: asym RTN in numpy (codes as uint8, packed with np.packbits-free shifts)."""
    g = w.reshape(w.shape[0], -1, gs)
    xmax, xmin = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
    s = np.clip((xmax - xmin) / (2**bits - 1), 1e-5, 1e4).astype(np.float16).astype(np.float32)
    z = np.round(np.clip(-xmin / s, -1e4, 1e4))
    q = np.clip(np.round(g / s) + z, 0, 2**bits - 1).astype(np.uint32).reshape(w.shape[0], -1)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    packed = (q.reshape(w.shape[0], -1, per) << shifts).sum(-1, dtype=np.uint32)
    unpacked = ((packed[..., None] >> shifts) & (2**bits - 1)).reshape(w.shape[0], -1, gs)
    return packed, ((unpacked - z) * s).reshape(w.shape)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def storage_table(rows: int = 1024, cols: int = 4096) -> None:
    w = jnp.asarray(np.random.default_rng(0).normal(0, 0.02, (rows, cols)), jnp.float32)
    print(f"\nBits per parameter, group 64, weight {rows}x{cols} (every stored bit counted)")
    print(f"{'scheme':<6} {'bits':>4} | {'fp16 consts':>11} | {'fp32 consts':>11} | {'double quant':>12}")
    print("-" * 56)
    for scheme in ("asym", "sym", "nf"):
        for bits in (2, 3, 4, 8):
            if scheme == "nf" and bits == 8:
                continue
            vals = [
                bits_per_param(quantize(w, QuantConfig(bits=bits, group_size=64, scheme=scheme, **kw)))
                for kw in (dict(scale_dtype="float16"), dict(scale_dtype="float32"), dict(double_quant=True))
            ]
            print(f"{scheme:<6} {bits:>4} | {vals[0]:>11.3f} | {vals[1]:>11.3f} | {vals[2]:>12.3f}")
    print("reference: bitsandbytes NF4 with double quant ~= 4.127 bits/param")


def speed_table(size: int, repeats: int) -> None:
    w_np = np.random.default_rng(1).normal(0, 0.02, (size, size)).astype(np.float32)
    w = jnp.asarray(w_np)
    print(f"\nQuantize + dequantize, {size}x{size} fp32 on {jax.devices()[0].platform.upper()}, median of {repeats}")
    print(f"{'bits':>4} | {'apiq_jax (jit) s':>16} | {'numpy s':>9} | {'speed-up':>8} | {'max |diff|':>10}")
    print("-" * 62)
    for bits in (2, 4, 8):
        cfg = QuantConfig(bits=bits, group_size=64)
        fn = jax.jit(lambda x: dequantize(quantize(x, cfg)))
        t_jax = time_call(lambda: fn(w).block_until_ready(), repeats)
        t_np = time_call(lambda: numpy_quant_dequant(w_np, bits, 64), repeats)
        diff = float(np.max(np.abs(np.asarray(fn(w)) - numpy_quant_dequant(w_np, bits, 64)[1])))
        print(f"{bits:>4} | {t_jax:>16.4f} | {t_np:>9.4f} | {t_np / t_jax:>7.2f}x | {diff:>10.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    storage_table()
    speed_table(args.size, args.repeats)


if __name__ == "__main__":
    main()
