"""CLoQ's closed form (Deng et al. 2025, arXiv 2501.18475): the activation-weighted low-rank fit of ``W - Q``.

For a linear ``y = x W^T`` (``W [out, in]``) quantized to ``Q`` and the inputs ``X [n, in]``
of the calibration data, CLoQ chooses the rank-r correction that minimises the error of
the layer's *outputs* rather than of its weights::

    min_{rank(L) <= r} || X (W - Q)^T - X L ||_F,      L = scale * a @ b  [in, out]

With ``H = X^T X + lambda I`` (the ridge ``lambda = ridge * mean(diag(X^T X))`` makes a
singular ``X^T X``, e.g. fewer tokens than inputs or dead features, solvable; it is the
same problem with ``sqrt(lambda) I`` appended to ``X``) and ``D = (W - Q)^T``::

    || X (D - L) ||_F^2 + lambda || D - L ||_F^2 = || H^{1/2} (D - L) ||_F^2

so with ``U S V^T = svd(H^{1/2} D)`` the minimiser is ``L = H^{-1/2} U_r S_r V_r^T``
(Eckart-Young in the ``H``-weighted norm). When ``H`` is a multiple of the identity this
is the plain rank-r SVD of ``W - Q``, i.e. LoftQ's one-iteration factors.

Everything here is pure and jit-able; :mod:`apiq_jax.calibration.cloq` wires it to models.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_RIDGE", "CLoQFactors", "cloq_factors", "weighted_error"]

#: the ridge, as a fraction of the mean diagonal of ``X^T X`` (as GPTQ's ``percdamp``)
DEFAULT_RIDGE = 0.01


class CLoQFactors(NamedTuple):
    """Output of :func:`cloq_factors`.

    Attributes:
      a: LoRA ``a [in, r]``.
      b: LoRA ``b [r, out]``; ``scale * a @ b`` is the minimiser ``L [in, out]``.
      s: the top singular values ``S_r`` of ``H^{1/2} (W - Q)^T`` ``[r]``.
    """

    a: jnp.ndarray
    b: jnp.ndarray
    s: jnp.ndarray


def _check(residual: jnp.ndarray, gram: jnp.ndarray, rank: int, ridge: float) -> None:
    out_dim, in_dim = residual.shape
    if gram.shape != (in_dim, in_dim):
        raise ValueError(f"gram has shape {tuple(gram.shape)}; expected ({in_dim}, {in_dim}) for a residual "
                         f"of shape {tuple(residual.shape)}")
    if not 1 <= rank <= min(out_dim, in_dim):
        raise ValueError(f"rank={rank!r} must lie in [1, {min(out_dim, in_dim)}] for a weight of shape "
                         f"{tuple(residual.shape)}")
    if not ridge > 0:
        raise ValueError(f"ridge={ridge!r} must be > 0 (a fraction of the mean diagonal of X^T X)")


@partial(jax.jit, static_argnames=("rank", "ridge"))
def cloq_factors(residual: jnp.ndarray, gram: jnp.ndarray, rank: int, scale: float | jnp.ndarray = 1.0,
                 ridge: float = DEFAULT_RIDGE) -> CLoQFactors:
    """The rank-r LoRA factors minimising ``||X (W - Q)^T - scale X a b||_F`` (ridge-regularised).

    Args:
      residual: ``W - Q`` ``[out, in]`` (any float dtype; computed in float32).
      gram: ``X^T X`` ``[in, in]`` of the layer's inputs (any positive multiple: only its
        shape matters, the ridge is relative to its mean diagonal).
      rank: r (static), in ``[1, min(out, in)]``.
      scale: the LoRA scaling ``alpha / r`` the factors will be used with (they are divided
        by it, half on each side, as LoftQ's are).
      ridge: ``lambda / mean(diag(X^T X))`` (static, > 0).

    Returns:
      :class:`CLoQFactors` in float32.

    Raises:
      ValueError: mismatched shapes, a rank out of range or a ridge <= 0.
    """
    _check(residual, gram, rank, ridge)
    d = residual.astype(jnp.float32).T  # [in, out]
    h = gram.astype(jnp.float32)
    h = 0.5 * (h + h.T)
    lam = ridge * jnp.maximum(jnp.mean(jnp.diag(h)), jnp.finfo(jnp.float32).tiny)
    evals, evecs = jnp.linalg.eigh(h + lam * jnp.eye(h.shape[0], dtype=jnp.float32))
    evals = jnp.maximum(evals, lam)  # H >= lambda I in exact arithmetic; rounding cannot go below it
    root = jnp.sqrt(evals)
    h_half = (evecs * root[None, :]) @ evecs.T
    h_inv_half = (evecs / root[None, :]) @ evecs.T
    u, s, vh = jnp.linalg.svd(h_half @ d, full_matrices=False)
    sr = jnp.sqrt(s[:rank])
    inv = 1.0 / jnp.sqrt(jnp.asarray(scale, jnp.float32))
    a = (h_inv_half @ (u[:, :rank] * sr[None, :])) * inv  # [in, r]
    b = (sr[:, None] * vh[:rank]) * inv  # [r, out]
    return CLoQFactors(a=a, b=b, s=s[:rank])


@jax.jit
def weighted_error(residual: jnp.ndarray, gram: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray,
                   scale: float | jnp.ndarray = 1.0) -> jnp.ndarray:
    """``||X ((W - Q)^T - scale a b)||_F^2`` from ``X^T X`` (no ridge): the layer's output error.

    Args:
      residual: ``W - Q`` ``[out, in]``.
      gram: ``X^T X`` ``[in, in]``.
      a, b: LoRA factors ``[in, r]``, ``[r, out]``.
      scale: the LoRA scaling.

    Returns:
      The float32 scalar ``tr(E^T X^T X E)``, ``E = (W - Q)^T - scale a b``.
    """
    e = residual.astype(jnp.float32).T - jnp.asarray(scale, jnp.float32) * (a.astype(jnp.float32)
                                                                           @ b.astype(jnp.float32))
    return jnp.sum(e * (gram.astype(jnp.float32) @ e))
