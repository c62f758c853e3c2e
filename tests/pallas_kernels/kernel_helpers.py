"""Shared builders of the kernel tests: packed weights, activations, float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.quant import QuantConfig, dequantize, quantize
from pallas_kernels import prepare_weights

# (M, N, K): multiples of the blocks, and not (K=172 with group 64 is a real MLP width).
SHAPES = [(1, 200, 172), (5, 128, 256), (64, 136, 384)]


def make(bits: int, scheme: str, n: int, k: int, gs: int = 64, seed: int = 0):
    """(QuantizedTensor, PreparedWeights, dense reference weight [N, K] float32)."""
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    qt = quantize(w, QuantConfig(bits=bits, group_size=gs, scheme=scheme))
    zeros = qt.zeros if scheme == "asym" else None
    prep = prepare_weights(qt.codes, qt.scales, zeros, bits=bits, k=k, group_size=gs, scheme=scheme)
    return qt, prep, np.asarray(dequantize(qt), np.float32)


def xs(m: int, k: int, dtype=jnp.float32, seed: int = 1) -> jnp.ndarray:
    """Standard-normal activations ``[m, k]`` in ``dtype``."""
    return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32).astype(dtype)


def ref_matmul(x: jnp.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 numpy: what the dense model computes (weight cast to x's dtype, exact sums)."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w64 = np.asarray(jnp.asarray(w).astype(x.dtype).astype(jnp.float32), np.float64)
    return x64 @ w64.T
