"""CLoQ's closed form (apiq_jax/calibration/cloq_core.py) against a float64 numpy solution of the same problem."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration.cloq_core import DEFAULT_RIDGE, cloq_factors, weighted_error


def _numpy_cloq(d: np.ndarray, gram: np.ndarray, rank: int, ridge: float) -> np.ndarray:
    """float64 reference by another route: Cholesky H = C C^T, best rank-r of C^T D, mapped back by C^-T.

    ``||X (D - L)||^2 + lam ||D - L||^2 = ||C^T (D - L)||^2``, minimised by ``L = C^-T svd_r(C^T D)``.
    """
    h = gram + ridge * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
    c = np.linalg.cholesky(h)
    u, s, vt = np.linalg.svd(c.T @ d, full_matrices=False)
    return np.linalg.solve(c.T, (u[:, :rank] * s[:rank]) @ vt[:rank])


def _objective(d, gram, lmat, ridge):
    e = d - lmat
    return float(np.sum(e * (gram @ e)) + ridge * np.mean(np.diag(gram)) * np.sum(e * e))


def _problem(seed: int, out_dim: int, in_dim: int, n: int):
    rng = np.random.default_rng(seed)
    residual = rng.standard_normal((out_dim, in_dim))
    # correlated, unevenly scaled inputs, as activations are (a few large channels)
    x = rng.standard_normal((n, in_dim)) @ rng.standard_normal((in_dim, in_dim)) * rng.uniform(0.1, 3.0, in_dim)
    return residual, x.T @ x


@pytest.mark.parametrize("out_dim,in_dim,n,rank", [(48, 32, 200, 4), (24, 40, 200, 8), (32, 32, 16, 6)])
def test_matches_float64_numpy(out_dim, in_dim, n, rank):
    """Same minimiser as the float64 Cholesky route, also with fewer tokens than inputs (singular X^T X)."""
    residual, gram = _problem(out_dim + n, out_dim, in_dim, n)
    scale = 2.0
    f = cloq_factors(jnp.asarray(residual, jnp.float32), jnp.asarray(gram, jnp.float32), rank, scale)
    assert f.a.shape == (in_dim, rank) and f.b.shape == (rank, out_dim)
    ours = scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    ref = _numpy_cloq(residual.T, gram, rank, DEFAULT_RIDGE)
    # float32 eigh/svd against float64: measured <= 2e-5 of the max entry; bound 2e-4
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    # the weighted objective is the optimum's to float32 precision, and well below the plain SVD's
    opt = _objective(residual.T, gram, ref, DEFAULT_RIDGE)
    assert _objective(residual.T, gram, ours, DEFAULT_RIDGE) <= opt * (1 + 1e-4)
    u, s, vt = np.linalg.svd(residual.T, full_matrices=False)
    plain = (u[:, :rank] * s[:rank]) @ vt[:rank]
    assert opt < _objective(residual.T, gram, plain, DEFAULT_RIDGE)


def test_identity_gram_is_plain_svd():
    """With X^T X = I the weighting is uniform: the factors are the rank-r SVD of W - Q (LoftQ's)."""
    rng = np.random.default_rng(3)
    residual = rng.standard_normal((40, 24))
    f = cloq_factors(jnp.asarray(residual, jnp.float32), jnp.eye(24), 5, 1.0)
    u, s, vt = np.linalg.svd(residual.T, full_matrices=False)
    ref = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(np.asarray(f.a @ f.b, np.float64), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # S is that of H^{1/2} (W - Q)^T with H = (1 + ridge) I
    np.testing.assert_allclose(np.asarray(f.s), np.sqrt(1 + DEFAULT_RIDGE) * s[:5], rtol=1e-5)


def test_factors_balanced_and_scale_divided():
    """``scale * a @ b`` does not depend on the scale, and a and b carry sqrt(S) each (as LoftQ's)."""
    residual, gram = _problem(7, 16, 16, 64)
    f1 = cloq_factors(jnp.asarray(residual, jnp.float32), jnp.asarray(gram, jnp.float32), 3, 1.0)
    f4 = cloq_factors(jnp.asarray(residual, jnp.float32), jnp.asarray(gram, jnp.float32), 3, 4.0)
    np.testing.assert_allclose(np.asarray(4.0 * f4.a @ f4.b), np.asarray(f1.a @ f1.b), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f4.b), np.asarray(f1.b) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(f1.b), axis=1), np.sqrt(np.asarray(f1.s)), rtol=1e-5)


def test_weighted_error_matches_numpy():
    residual, gram = _problem(11, 12, 20, 50)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 3)), rng.standard_normal((3, 12))
    e = residual.T - 1.5 * a @ b
    ref = np.sum(e * (gram @ e))
    got = float(weighted_error(jnp.asarray(residual), jnp.asarray(gram), jnp.asarray(a), jnp.asarray(b), 1.5))
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, r"rank=0 must lie in \[1, 8\]"),
    ({"rank": 9}, r"rank=9 must lie in \[1, 8\]"),
    ({"ridge": 0.0}, r"ridge=0.0 must be > 0"),
    ({"gram": np.eye(7)}, r"gram has shape \(7, 7\); expected \(8, 8\)"),
])
def test_bad_arguments(kwargs, match):
    args = {"residual": np.ones((16, 8), np.float32), "gram": np.eye(8), "rank": 2, "ridge": DEFAULT_RIDGE}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cloq_factors(jnp.asarray(args["residual"]), jnp.asarray(args["gram"]), args["rank"], 1.0, args["ridge"])
