"""pallas_kernels.ops: the custom-VJP entry point, per-call block sizes and the reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, block_sizes_for, qmatmul, qmatmul_reference
from tests.pallas_kernels.kernel_helpers import make, ref_matmul, xs


@pytest.mark.parametrize("bits,scheme", [(3, "asym"), (4, "sym")])
@pytest.mark.parametrize("dtype,rtol,atol", [(jnp.float32, 1e-6, 1e-5), (jnp.bfloat16, 1e-5, 1e-4)])
def test_reference_matches_float64_numpy(bits, scheme, dtype, rtol, atol):
    _, prep, w = make(bits, scheme, 200, 172)
    x = xs(7, 172, dtype)
    y = qmatmul_reference(x, prep)
    assert y.shape == (7, 200) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=rtol, atol=atol)


@pytest.mark.parametrize("platform,blocks", [
    ("gpu", BlockSizes(16, 32, 64)),
    ("gpu", BlockSizes(32, 64, 32)),
    ("tpu", BlockSizes(8, 128, 128)),
])
def test_per_call_block_sizes_give_the_default_result(platform, blocks):
    """Tolerances: float32 summation order only (1e-5 vs the default and the reference);
    1e-4 absolute vs the float64 numpy product (|y| ~ 30)."""
    _, prep, w = make(2, "asym", 200, 172)
    x, r = xs(5, 172), xs(5, 200, seed=3)
    run = lambda b: lambda x: qmatmul(x, prep, platform=platform, interpret=True, block_sizes=b)  # noqa: E731
    y, y_default = run(blocks)(x), run(None)(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_default), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(qmatmul_reference(x, prep)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), ref_matmul(x, w), rtol=1e-5, atol=1e-4)
    loss = lambda b: lambda x: jnp.sum(run(b)(x) * r)  # noqa: E731
    dx = jax.grad(loss(blocks))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(qmatmul_reference(x, prep) * r))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(r, np.float64) @ w, rtol=1e-5, atol=1e-4)


def _pallas_grids(jaxpr) -> list[tuple[int, ...]]:
    grids = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            grids.append(tuple(eqn.params["grid_mapping"].grid))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    grids += _pallas_grids(getattr(inner, "jaxpr", inner))
    return grids


def test_backward_uses_the_forward_block_sizes():
    _, prep, _ = make(2, "asym", 200, 172)  # N_pad = K_pad = 256
    x = xs(5, 172)
    for b, fwd, bwd in ((BlockSizes(16, 32, 64), (1, 8), (1, 4)), (None, (1, 2), (1, 1))):
        assert b is not None or block_sizes_for("gpu", 5) == BlockSizes(16, 128, 256)
        f = lambda x, b=b: jnp.sum(qmatmul(x, prep, platform="gpu", interpret=True, block_sizes=b))  # noqa: E731
        assert _pallas_grids(jax.make_jaxpr(jax.grad(f))(x).jaxpr) == [fwd, bwd], b


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


@pytest.mark.parametrize("blocks", [None, BlockSizes(32, 64, 128)])
def test_triton_and_mosaic_lowering_without_accelerator(blocks):
    """The Python-side lowering (Triton IR / Mosaic MLIR) of fwd + bwd runs on CPU."""
    _, prep, _ = make(3, "asym", 128, 256)
    x = xs(4, 256, jnp.bfloat16)
    for platform, target, name in (("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")):
        b = None if blocks is None or platform == "tpu" else blocks
        f = jax.grad(lambda x: qmatmul(x, prep, platform=platform, block_sizes=b).astype(jnp.float32).sum())
        text = jax.jit(f).trace(x).lower(lowering_platforms=(target,)).as_text()
        found = set(re.findall(r'custom_call_target\s*=\s*"([^"]+)"', text))
        found |= set(re.findall(r"stablehlo.custom_call @(\S+)\(", text))
        assert found == {name}, (platform, found)


def test_errors_name_the_value_and_accepted_ones():
    qt, prep, _ = make(2, "asym", 64, 128)
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
    with pytest.raises(ValueError, match=r"M=0 rows; accepted: M >= 1"):
        qmatmul(xs(0, 128), prep, interpret=True)
    with pytest.raises(ValueError, match=r"block_sizes must be a BlockSizes or None, got tuple"):
        qmatmul(xs(2, 128), prep, interpret=True, block_sizes=(16, 128, 256))
    with pytest.raises(ValueError, match=r"block_m=8 is too small for the GPU kernel"):
        qmatmul(xs(2, 128), prep, platform="gpu", interpret=True, block_sizes=BlockSizes(8, 128, 256))
    with pytest.raises(ValueError, match=r"block_n=64 is not supported on TPU"):
        qmatmul(xs(2, 128), prep, platform="tpu", interpret=True, block_sizes=BlockSizes(8, 64, 256))
    with pytest.raises(ValueError, match=r"K=100 columns"):
        qmatmul_reference(xs(2, 100), prep)
