"""Low-bit matmul ``x @ W^T`` with packed weights: time, weight GB/s, TFLOP/s vs dense bf16.

Rows per (M, K, N): every qmatmul backend this machine can run, plus
"dequant+matmul" (``x @ dequantize(qt).T``, what the model did before the kernels) and
"dense bf16" (``x @ W.T`` with a dense bfloat16 weight) measured in the same run; the
ratio column is dense time / row time (> 1: faster than dense). GB/s counts the bytes
of the stored weight (packed codes + constants; bf16 for the dense row).

    python benchmarks/kernels.py [--quick] [--bits 4] [--reps 5] [--block-sizes 16,128,256]

``--quick`` uses smaller shapes for CPUs. ``--block-sizes M,N,K`` runs the kernels with
those tiles instead of :func:`pallas_kernels.block_sizes_for`'s (the numbers to compare
when adding a device kind to ``pallas_kernels.tuning.TUNED_BLOCK_SIZES``). The Pallas interpreter ("interpret") is only
timed at the smallest shape of a run: at larger sizes it measures the interpreter, not
the kernel, and would take minutes. "pallas" rows need a GPU or TPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from apiq_jax.qmatmul import prepare, qmatmul
from apiq_jax.quant import QuantConfig, dequantize, quantize
from pallas_kernels import BlockSizes

FULL_M = (1, 16, 128, 1024)
FULL_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
QUICK_M = (1, 16, 128)
QUICK_KN = ((1024, 1024), (1024, 2752), (2752, 1024))


def _time(fn: Callable[[], jax.Array], reps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)  # best of reps: least disturbed by other load on a shared machine


def _weight_bytes(qt) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(qt))


def bench_shape(
    m: int, k: int, n: int, bits: int, reps: int, backends: list[str], block_sizes: BlockSizes | None = None
) -> list[tuple]:
    """Time every row of one shape.

    Args:
      m, k, n: the shape of ``x [M, K] @ W^T [K, N]``. bits: code width (group 64, asym).
      reps: timed repetitions (best kept). backends: qmatmul backends to time.
      block_sizes: tiles of the kernel rows (None: the tables).
    Returns:
      Rows ``(name, seconds, weight bytes)``, the dense bf16 row first.
    """
    kw, kx = jax.random.split(jax.random.key(m * 7 + k + n))
    w = jax.random.normal(kw, (n, k), jnp.float32) * 0.02
    qt = quantize(w, QuantConfig(bits=bits, group_size=64))
    w16 = w.astype(jnp.bfloat16)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    dims = (((1,), (1,)), ((), ()))
    dense = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))
    deq = jax.jit(lambda x, q: jax.lax.dot_general(x, dequantize(q).astype(x.dtype), dims,
                                                   preferred_element_type=jnp.float32))
    rows = [("dense bf16", _time(lambda: dense(x, w16), reps), w16.size * 2)]
    qbytes = _weight_bytes(qt)
    rows.append(("dequant+matmul", _time(lambda: deq(x, qt), reps), qbytes))
    for b in backends:
        f = jax.jit(lambda x, q, b=b: qmatmul(x, q, backend=b, block_sizes=block_sizes))
        rows.append((b, _time(lambda: f(x, qt), reps), qbytes))
        if b == "pallas":  # kernel layout prepared once, as apiq_jax.qmatmul.prepare_params does
            pw = prepare(qt)  # a QuantizedTensor in the kernel layout
            rows.append(("pallas prepared", _time(lambda: f(x, pw), reps), _weight_bytes(pw)))
    return rows


def _block_sizes(text: str) -> BlockSizes:
    try:
        m, n, k = (int(v) for v in text.split(","))
        return BlockSizes(m, n, k)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--block-sizes {text!r}: {e}") from None


def main() -> None:
    """Print the table for the shapes and options on the command line.

    Returns:
      None.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (CPU)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block-sizes", type=_block_sizes, default=None, metavar="M,N,K",
                    help="kernel tiles (default: pallas_kernels.block_sizes_for)")
    args = ap.parse_args()
    ms, kns = (QUICK_M, QUICK_KN) if args.quick else (FULL_M, FULL_KN)
    platform = jax.default_backend()
    dev = jax.devices()[0]
    accel = platform in ("gpu", "tpu")
    print(f"Date {datetime.date.today()}; device {platform}: {dev.device_kind} "
          f"({os.cpu_count()} CPUs visible); jax {jax.__version__}")
    print(f"{args.bits}-bit asym, group 64, x bfloat16, float32 accumulation, best of {args.reps}"
          f"{'; --quick shapes' if args.quick else ''}; kernel tiles {args.block_sizes or 'from the tables'}")
    if not accel:
        print("pallas: not measured (no GPU/TPU on this machine); interpret: smallest shape only")
    hdr = f"{'M':>5} {'K':>6} {'N':>6} | {'backend':<15} | {'time ms':>9} | {'wt GB/s':>8} | {'TFLOP/s':>8} | {'vs dense':>8}"
    print(hdr)
    print("-" * len(hdr))
    first = True
    for k, n in kns:
        for m in ms:
            backends = (["pallas"] if accel else []) + ["xla"] + (["interpret"] if first else [])
            first = False
            rows = bench_shape(m, k, n, args.bits, args.reps, backends, args.block_sizes)
            t_dense = rows[0][1]
            for name, t, nbytes in rows:
                print(f"{m:>5} {k:>6} {n:>6} | {name:<15} | {t * 1e3:>9.3f} | {nbytes / t / 1e9:>8.2f} | "
                      f"{2 * m * k * n / t / 1e12:>8.4f} | {t_dense / t:>7.2f}x")
    if not accel:
        print("interpret rows beyond the first shape: skipped (interpreter, minutes per call)")


if __name__ == "__main__":
    main()
