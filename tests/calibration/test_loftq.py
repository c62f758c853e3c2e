"""LoftQ (apiq_jax/calibration/loftq.py) against peft 0.11.1 golden vectors
(shared/golden/loftq.npz), and on a tiny Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import loftq_init, rtn_init
from apiq_jax.calibration.loftq import loftq_matrix
from apiq_jax.lora import LoraConfig
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize, fake_quantize, nf_codebook
from tests.calibration.conftest import TINY_LCFG as LCFG
from tests.calibration.test_rtn import check_result

GOLDEN_CASES = [(2, 1), (2, 5), (4, 1), (4, 5)]


# --- LoftQ vs peft ---------------------------------------------------------------------------
def _nf_cfg(bits: int) -> QuantConfig:
    return QuantConfig(bits=bits, group_size=64, scheme="nf", scale_dtype="float32")


@pytest.mark.parametrize("bits", [2, 4])
def test_loftq_codebook_matches_peft(loftq_golden, bits):
    np.testing.assert_allclose(nf_codebook(bits), loftq_golden[f"codebook_{bits}bit"], rtol=0, atol=3e-7)


@pytest.mark.parametrize("bits,num_iter", GOLDEN_CASES)
def test_loftq_matches_golden(loftq_golden, bits, num_iter):
    golden = loftq_golden
    k = f"b{bits}_it{num_iter}"
    w = jnp.asarray(golden["W"])
    res = loftq_matrix(w, _nf_cfg(bits), 8, 1.0, num_iter, history=True)
    book = golden[f"codebook_{bits}bit"]
    iter_q = np.asarray(res.iter_q)
    assert iter_q.shape == golden[k + "/iter_Q"].shape
    for t in range(num_iter):
        ref_q = golden[k + "/iter_Q"][t]
        # every code of every iteration is identical (code read back against peft's absmax) ...
        absmax = golden[k + "/iter_absmax"][t].reshape(64, 2, 1)
        codes = np.abs(iter_q[t].reshape(64, 2, 64)[..., None] / absmax[..., None] - book).argmin(-1)
        np.testing.assert_array_equal(codes.reshape(64, 128), golden[k + "/iter_codes"][t])
        # ... and the values agree to float32 rounding of absmax / the residual
        np.testing.assert_allclose(iter_q[t], ref_q, rtol=0, atol=2e-6 * np.abs(ref_q).max())
        np.testing.assert_allclose(np.asarray(res.iter_s[t]), golden[k + "/iter_S"][t], rtol=0, atol=1e-6)
    q = np.asarray(dequantize(res.q))
    np.testing.assert_array_equal(q, iter_q[-1])  # the stored tensor is the last Q_t
    ref_a, ref_b = golden[k + "/lora_A"], golden[k + "/lora_B"]
    ba = np.asarray(res.a @ res.b).T
    # float32 truncated SVD: its rounding depends on the CPU's LAPACK kernels (worst element
    # measured 1.3e-5 of the max on this project's 2-core x86 machines, under 1e-5 elsewhere)
    np.testing.assert_allclose(ba, ref_b @ ref_a, rtol=0, atol=2e-5 * np.abs(ref_b @ ref_a).max())
    # factors individually, up to one sign per rank component (singular vectors of nearly
    # equal singular values are ill-conditioned, hence the looser bound)
    a, b = np.asarray(res.a).T, np.asarray(res.b).T  # peft layout: A [r, in], B [out, r]
    sign = np.sign(np.sum(a * ref_a, axis=1))
    assert np.all(sign != 0)
    np.testing.assert_allclose(a * sign[:, None], ref_a, rtol=0, atol=1e-4 * np.abs(ref_a).max())
    np.testing.assert_allclose(b * sign[None, :], ref_b, rtol=0, atol=1e-4 * np.abs(ref_b).max())


def test_loftq_reconstruction_errors_match_readme(loftq_golden):
    """README: ||W - Q|| / ||W - Q - BA|| = 1.340 / 0.809 for b2_it5."""
    w = loftq_golden["W"]
    res = loftq_matrix(jnp.asarray(w), _nf_cfg(2), 8, 1.0, 5)
    q = np.asarray(dequantize(res.q))
    assert np.linalg.norm(w - q) == pytest.approx(1.340, abs=2e-3)
    assert np.linalg.norm(w - q - np.asarray(res.a @ res.b).T) == pytest.approx(0.809, abs=2e-3)


def test_loftq_factors_absorb_lora_scale(loftq_golden):
    w = jnp.asarray(loftq_golden["W"])
    base = loftq_matrix(w, _nf_cfg(2), 8, 1.0, 2)
    scaled = loftq_matrix(w, _nf_cfg(2), 8, 4.0, 2)
    np.testing.assert_array_equal(np.asarray(dequantize(base.q)), np.asarray(dequantize(scaled.q)))
    np.testing.assert_allclose(4.0 * np.asarray(scaled.a @ scaled.b), np.asarray(base.a @ base.b),
                               rtol=1e-5, atol=1e-7)
    # half of the scale on each side
    np.testing.assert_allclose(np.abs(np.asarray(scaled.a)) * 2.0, np.abs(np.asarray(base.a)), rtol=1e-5, atol=1e-8)


def test_loftq_uniform_quantizer_and_more_iterations_help():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 96)) * 0.02
    cfg = QuantConfig(bits=2, group_size=32, scheme="asym", scale_dtype="float32")
    r1 = loftq_matrix(w, cfg, 8, 2.0, 1)
    assert isinstance(r1.q, QuantizedTensor) and r1.q.config == cfg
    np.testing.assert_array_equal(np.asarray(dequantize(r1.q)), np.asarray(fake_quantize(w, cfg)))
    err_q = float(jnp.linalg.norm(w - dequantize(r1.q)))
    err_1 = float(jnp.linalg.norm(w - dequantize(r1.q) - 2.0 * (r1.a @ r1.b).T))
    assert err_1 < err_q
    assert r1.a.shape == (96, 8) and r1.b.shape == (8, 64)


def test_loftq_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        loftq_matrix(jnp.zeros((8, 16)), _nf_cfg(2), 9, 1.0, 1)


def test_loftq_init_model(tiny):
    cfg, params, ids = tiny
    qcfg = QuantConfig(bits=2, group_size=32, scheme="nf")
    res = loftq_init(params, cfg, ids, qcfg, LCFG, key=jax.random.PRNGKey(2), num_iter=2)
    check_result(res, cfg, params, "loftq")
    rtn = rtn_init(params, cfg, ids, qcfg, LCFG, key=jax.random.PRNGKey(2))
    w = params["layers"][0]["q_proj"]
    ab = res.lora["layers"][0]["q_proj"]
    recon = dequantize(res.params["layers"][0]["q_proj"]) + LCFG.scale * (ab["a"] @ ab["b"]).T
    assert float(jnp.linalg.norm(w - recon)) < float(jnp.linalg.norm(w - dequantize(rtn.params["layers"][0]["q_proj"])))
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(params, cfg, ids, qcfg, LCFG, key=jax.random.PRNGKey(2), num_iter=0)
    with pytest.raises(ValueError, match="rank"):
        loftq_init(params, cfg, ids, qcfg, LoraConfig(rank=65, alpha=8.0), key=jax.random.PRNGKey(2))
