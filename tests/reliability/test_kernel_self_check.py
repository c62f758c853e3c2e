"""``auto`` trusts the Pallas kernel only after a one-time self-check against the XLA path.

On CPU the GPU kernel runs in Pallas' interpreter; faulty kernels (a wrong product, a
wrong ``dx``, a compile error) are injected in place of ``pallas_kernels.qmatmul``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from apiq_jax import qmatmul as qm

REAL = pallas_kernels.qmatmul


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(qm, "_SELF_CHECKS", {})


def _scaled_forward(x, w, **kw):
    return REAL(x, w, **kw) * 1.05  # 5% off: far beyond float32 rounding


def _wrong_backward(x, w, **kw):
    @jax.custom_vjp
    def f(x):
        return REAL(x, w, **kw)

    f.defvjp(lambda x: (REAL(x, w, **kw), x), lambda x, dy: (jax.grad(lambda x: jnp.sum(REAL(x, w, **kw) * dy))(x)
                                                             * 2.0,))
    return f(x)


def _no_compile(x, w, **kw):
    raise RuntimeError("Triton lowering failed: unsupported layout\nsecond line")


def test_the_real_kernel_passes_in_the_interpreter():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qm.kernel_self_check("gpu", interpret=True) is True


@pytest.mark.parametrize("faulty,reason", [(_scaled_forward, "relative error y"),
                                           (_wrong_backward, "relative error dx"),
                                           (_no_compile, "RuntimeError: Triton lowering failed")])
def test_a_faulty_kernel_is_refused_once_with_the_setting_named(monkeypatch, faulty, reason):
    monkeypatch.setattr(pallas_kernels, "qmatmul", faulty)
    with pytest.warns(RuntimeWarning) as record:
        assert qm.kernel_self_check("gpu", interpret=True) is False
    assert len(record) == 1
    msg = str(record[0].message)
    assert reason in msg and "$APIQ_QMATMUL_BACKEND=xla" in msg and "$APIQ_QMATMUL_BACKEND=pallas" in msg
    assert "second line" not in msg  # one line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device kind: no second warning, no re-run
        monkeypatch.setattr(pallas_kernels, "qmatmul", REAL)
        assert qm.kernel_self_check("gpu", interpret=True) is False


def test_auto_falls_back_to_xla_when_the_check_fails(monkeypatch):
    """As on a GPU whose kernel is wrong: "auto" resolves to "xla"; an explicit "pallas" is still honoured."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_kernels, "qmatmul", _scaled_forward)
    real_check = qm.kernel_self_check
    monkeypatch.setattr(qm, "kernel_self_check", lambda platform: real_check(platform, interpret=True))
    with pytest.warns(RuntimeWarning, match="uses the XLA path instead"):
        assert qm.resolve_backend("auto") == "xla"
    assert qm.resolve_backend("pallas") == "pallas"
    monkeypatch.setattr(qm, "_SELF_CHECKS", {})
    monkeypatch.setattr(pallas_kernels, "qmatmul", REAL)
    assert qm.resolve_backend("auto") == "pallas"  # a kernel that agrees is used


def test_the_check_runs_eagerly_when_first_asked_inside_a_trace(monkeypatch):
    """resolve_backend is called while a function is traced: the check must not be staged into it."""
    results = []

    @jax.jit
    def f(x):
        results.append(qm.kernel_self_check("gpu", interpret=True))
        return x + 1

    f(jnp.ones(3))
    assert results == [True]
