"""Pallas low-bit matmul kernels vs dequantize-then-matmul (CPU, interpret mode)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import QuantConfig, dequantize, quantize
from pallas_kernels import BLOCKS, prepare_weights, qmatmul
from pallas_kernels.tuning import K_MULTIPLE, N_MULTIPLE, SMALL_M, blocks_for


def make(bits: int, scheme: str, n: int, k: int, gs: int = 64, seed: int = 0):
    """(QuantizedTensor, PreparedWeights, dense reference weight [N, K] float32)."""
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    qt = quantize(w, QuantConfig(bits=bits, group_size=gs, scheme=scheme))
    zeros = qt.zeros if scheme == "asym" else None
    prep = prepare_weights(qt.codes, qt.scales, zeros, bits=bits, k=k, group_size=gs, scheme=scheme)
    return qt, prep, np.asarray(dequantize(qt), np.float32)


def xs(m: int, k: int, dtype=jnp.float32, seed: int = 1) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (m, k), jnp.float32).astype(dtype)


def ref_matmul(x: jnp.ndarray, w: np.ndarray) -> np.ndarray:
    """What the dense model computes: weight cast to x's dtype, float32 accumulation."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w64 = np.asarray(jnp.asarray(w).astype(x.dtype).astype(jnp.float32), np.float64)
    return x64 @ w64.T


# (M, N, K): multiples of the blocks, and not (K=172 with group 64 is a real MLP width).
SHAPES = [(1, 200, 172), (5, 128, 256), (64, 136, 384)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gpu_kernel_float32_matches_dequantized(bits, scheme, m, n, k):
    _, prep, w = make(bits, scheme, n, k)
    x = xs(m, k)
    y = qmatmul(x, prep, platform="gpu", interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,m", [(2, 1), (3, 64), (4, 5)])
def test_gpu_kernel_bfloat16_matches_dequantized(bits, m):
    _, prep, w = make(bits, "asym", 200, 172)
    x = xs(m, 172, jnp.bfloat16)
    y = np.asarray(qmatmul(x, prep, platform="gpu", interpret=True))
    ref = ref_matmul(x, w)  # same bf16 operands, so only accumulation order differs
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("gs,k", [(32, 160), (128, 300), (512, 1024)])
def test_other_group_sizes(gs, k):
    """Groups shorter than, equal to and longer than the K block (512 > block_k)."""
    _, prep, w = make(4, "asym", 130, k, gs=gs)
    for m in (3, 40):  # small and large variants (different block_k)
        x = xs(m, k)
        y = qmatmul(x, prep, platform="gpu", interpret=True)
        np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bits,scheme,m", [(2, "asym", 5), (3, "sym", 20), (4, "asym", 1)])
def test_tpu_kernel_matches_dequantized_with_grad(bits, scheme, m):
    _, prep, w = make(bits, scheme, 200, 172)
    x = xs(m, 172)
    y = qmatmul(x, prep, platform="tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=1e-4)
    r = xs(m, 200, seed=3)
    dx = jax.grad(lambda x: jnp.sum(qmatmul(x, prep, platform="tpu", interpret=True) * r))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(r, np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_tpu_kernel_group_longer_than_block():
    _, prep, w = make(2, "sym", 128, 1024, gs=512)
    x = xs(4, 1024)
    y = qmatmul(x, prep, platform="tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bits,scheme,m", [(2, "asym", 1), (3, "sym", 64), (4, "asym", 5)])
def test_gpu_grad_wrt_x_matches_reference(bits, scheme, m):
    _, prep, w = make(bits, scheme, 200, 172)
    x, r = xs(m, 172), xs(m, 200, seed=3)
    loss = lambda x: jnp.sum(qmatmul(x, prep, platform="gpu", interpret=True) * r)  # noqa: E731
    ref = lambda x: jnp.sum((x @ jnp.asarray(w).T) * r)  # noqa: E731
    dx = jax.jit(jax.grad(loss))(x)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jax.grad(ref)(x)), rtol=1e-5, atol=1e-4)


def test_grad_bfloat16_input_and_frozen_weights():
    _, prep, w = make(3, "asym", 200, 172)
    x = xs(5, 172, jnp.bfloat16)
    dx, dw = jax.grad(lambda x, p: jnp.sum(qmatmul(x, p, interpret=True) ** 2), argnums=(0, 1), allow_int=True)(x, prep)
    assert dx.dtype == jnp.bfloat16
    y = ref_matmul(x, w)
    ref = 2 * y @ np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float32), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    assert not np.any(np.asarray(dw.scales)) and not np.any(np.asarray(dw.zeros))  # frozen
    assert all(p.dtype == jax.dtypes.float0 for p in dw.planes)


def test_prepare_weights_keeps_values_and_pads_with_zero_weights():
    qt, prep, w = make(3, "asym", 200, 172)
    assert prep.k_pad % K_MULTIPLE == 0 and prep.n_pad % N_MULTIPLE == 0
    assert prep.k_pad >= 172 and prep.n_pad >= 200
    assert [p.shape for p in prep.planes] == [(prep.k_pad // 16, prep.n_pad), (prep.k_pad // 32, prep.n_pad)]
    assert prep.scales.shape == (prep.k_pad // 64, 1, prep.n_pad)
    assert not np.any(np.asarray(prep.scales)[:, 0, 200:]) and not np.any(np.asarray(prep.scales)[3:])
    # one-hot rows of x read single weight columns back out of the kernel
    eye = jnp.eye(172, dtype=jnp.float32)[jnp.array([0, 63, 64, 171])]
    cols = np.asarray(qmatmul(eye, prep, interpret=True))
    np.testing.assert_array_equal(cols, w[:, [0, 63, 64, 171]].T)


def test_triton_and_mosaic_lowering_without_accelerator():
    """The Python-side lowering (Triton IR / Mosaic MLIR) of fwd + bwd runs on CPU."""
    _, prep, _ = make(3, "asym", 128, 256)
    x = xs(4, 256, jnp.bfloat16)
    for platform, target, name in (("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")):
        f = jax.grad(lambda x: qmatmul(x, prep, platform=platform).astype(jnp.float32).sum())
        text = jax.jit(f).trace(x).lower(lowering_platforms=(target,)).as_text()
        found = set(re.findall(r'custom_call_target\s*=\s*"([^"]+)"', text))
        found |= set(re.findall(r"stablehlo.custom_call @(\S+)\(", text))
        assert found == {name}, (platform, found)


def test_block_tables_respect_layout_invariants():
    for platform, table in BLOCKS.items():
        for b in table.values():
            assert K_MULTIPLE % b.block_k == 0 and N_MULTIPLE % b.block_n == 0
            assert b.block_k % 32 == 0
            assert all(v & (v - 1) == 0 for v in b), b
        assert blocks_for(platform, SMALL_M) == table["small"]
        assert blocks_for(platform, SMALL_M + 1) == table["large"]


def test_errors_name_the_value_and_accepted_ones():
    qt, prep, _ = make(2, "asym", 64, 128)
    args = dict(k=128, group_size=64, scheme="asym")
    with pytest.raises(ValueError, match=r"bits=8 .*accepted: \(2, 3, 4\)"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=8, k=128, group_size=64, scheme="asym")
    with pytest.raises(ValueError, match=r"scheme='nf'.*accepted"):
        prepare_weights(qt.codes, qt.scales, None, bits=2, k=128, group_size=64, scheme="nf")
    with pytest.raises(ValueError, match=r"group_size=96.*accepted: 32, 64, 128"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=2, k=128, group_size=96, scheme="asym")
    with pytest.raises(ValueError, match=r"8 words per row; 12 expected"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=3, **args)
    with pytest.raises(ValueError, match=r"zeros must be given"):
        prepare_weights(qt.codes, qt.scales, None, bits=2, **args)
    with pytest.raises(ValueError, match=r"codes must be uint32"):
        prepare_weights(qt.codes.astype(jnp.int32), qt.scales, qt.zeros, bits=2, **args)
    with pytest.raises(ValueError, match=r"K=100 columns but the weight has K=128"):
        qmatmul(xs(2, 100), prep, interpret=True)
    with pytest.raises(ValueError, match=r"float16 is not supported; accepted: \('float32', 'bfloat16'\)"):
        qmatmul(xs(2, 128, jnp.float16), prep, interpret=True)
    with pytest.raises(ValueError, match=r"platform='cuda'.*accepted: \('gpu', 'tpu'\)"):
        qmatmul(xs(2, 128), prep, platform="cuda")
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        qmatmul(xs(2, 128)[None], prep, interpret=True)
    with pytest.raises(ValueError, match=r"PreparedWeights"):
        qmatmul(xs(2, 128), qt, interpret=True)
