"""apiq_jax.qmatmul: backend selection, layouts, fallbacks, gradients and the model-level forward."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from apiq_jax import qmatmul as qm
from apiq_jax.lora import LoraConfig
from apiq_jax.models import (
    ModelConfig,
    apply,
    dequantize_params,
    forward,
    init_params,
    quantize_model,
)
from apiq_jax.quant import QuantConfig, QuantizedTensor, bits_per_param, dequantize, quantize

CFG = ModelConfig("LlamaForCausalLM", 96, 64, 172, 2, 4, 2, 16, tie_word_embeddings=False)


def _qt(cfg: QuantConfig, n: int = 200, k: int = 172, seed: int = 0):
    return quantize(jax.random.normal(jax.random.key(seed), (n, k), jnp.float32), cfg)


def _ref(x: jnp.ndarray, qt) -> np.ndarray:
    w = dequantize(qt).astype(x.dtype)
    return np.asarray(jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))


def test_backend_default_env_and_resolution(monkeypatch):
    monkeypatch.delenv(qm.ENV_VAR, raising=False)
    assert qm.default_backend() == "auto"
    auto = "xla" if jax.default_backend() == "cpu" else "pallas"
    assert qm.resolve_backend(None) == qm.resolve_backend("auto") == auto
    for name in ("xla", "interpret"):  # an already-resolved name passes through
        assert qm.resolve_backend(name) == qm.resolve_backend(qm.resolve_backend(name)) == name
    monkeypatch.setenv(qm.ENV_VAR, "interpret")
    assert qm.default_backend() == "interpret" and qm.resolve_backend(None) == "interpret"
    assert qm.resolve_backend("xla") == "xla"  # an explicit backend beats the env var
    monkeypatch.setenv(qm.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"'cuda' \(from \$APIQ_QMATMUL_BACKEND\).*accepted: \('auto', 'pallas', 'xla', 'interpret'\)"):
        qm.default_backend()
    assert qm.BACKENDS == ("auto", "pallas", "xla", "interpret")
    assert not hasattr(qm, "use_backend")  # no hidden backend state: pass backend= explicitly


def test_unknown_backend_and_bad_shapes_raise():
    qt = _qt(QuantConfig(bits=2, group_size=64))
    with pytest.raises(ValueError, match=r"backend 'triton'.*accepted: \('auto', 'pallas', 'xla', 'interpret'\)"):
        qm.qmatmul(jnp.ones((2, 172)), qt, backend="triton")
    with pytest.raises(ValueError, match=r"x2d must be \[M, 172\]"):
        qm.qmatmul(jnp.ones((2, 171)), qt)
    with pytest.raises(ValueError, match=r"qt must be a 2-D QuantizedTensor, got ArrayImpl"):
        qm.qmatmul(jnp.ones((2, 172)), jnp.ones((200, 172)))
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="backend 'pallas' needs a GPU or TPU"):
            qm.qmatmul(jnp.ones((2, 172)), qt, backend="pallas")


CONFIGS = [
    QuantConfig(bits=2, group_size=64),
    QuantConfig(bits=3, group_size=64, scheme="sym"),
    QuantConfig(bits=4, group_size=64, double_quant=True),  # densified constants
    QuantConfig(bits=3, group_size=64, scheme="sym", double_quant=True),
    QuantConfig(bits=4, group_size=64, scheme="nf"),  # falls back to XLA
    QuantConfig(bits=8, group_size=64),  # falls back to XLA
    QuantConfig(bits=2, group_size=None),  # one group of 172: falls back to XLA
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}b-{c.scheme}-dq{int(c.double_quant)}-g{c.group_size}")
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_matches_dequantize_then_matmul(cfg, backend):
    qt = _qt(cfg)
    for m, dtype, tol in ((1, jnp.float32, 1e-4), (64, jnp.bfloat16, 2e-3)):
        x = jax.random.normal(jax.random.key(m), (m, 172), jnp.float32).astype(dtype)
        y = qm.qmatmul(x, qt, backend=backend)
        assert y.shape == (m, 200) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), _ref(x, qt), rtol=1e-4, atol=tol)


def test_kernel_support_decides_the_fallback():
    assert qm.kernel_supports(_qt(QuantConfig(bits=3, group_size=64, double_quant=True)))
    assert not qm.kernel_supports(_qt(QuantConfig(bits=4, group_size=64, scheme="nf")))
    assert not qm.kernel_supports(_qt(QuantConfig(bits=2, group_size=None)))
    # the interpret backend really runs a Pallas kernel for a supported weight
    qt = _qt(QuantConfig(bits=2, group_size=64))
    jaxpr = str(jax.make_jaxpr(lambda x: qm.qmatmul(x, qt, backend="interpret"))(jnp.ones((3, 172))))
    assert "pallas_call" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x: qm.qmatmul(x, qt, backend="xla"))(jnp.ones((3, 172))))
    assert "pallas_call" not in jaxpr


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_grad_wrt_x_matches_dense(backend):
    qt = _qt(QuantConfig(bits=3, group_size=64))
    x = jax.random.normal(jax.random.key(1), (5, 172))
    r = jax.random.normal(jax.random.key(2), (5, 200))
    g = jax.jit(jax.grad(lambda x: jnp.sum(qm.qmatmul(x, qt, backend=backend) * r)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(r @ dequantize(qt)), rtol=1e-5, atol=1e-4)


def test_prepare_params_gives_quantized_tensor_leaves_in_the_kernel_layout():
    supported, unsupported = _qt(QuantConfig(bits=3, group_size=64)), _qt(QuantConfig(bits=4, scheme="nf"))
    tree = {"a": supported, "b": unsupported, "dense": jnp.ones((3,))}
    prepared = qm.prepare_params(tree)
    p = prepared["a"]
    assert isinstance(p, QuantizedTensor) and p.layout == "kernel"
    assert (p.shape, p.config, p.dtype) == (supported.shape, supported.config, supported.dtype)
    assert prepared["b"] is unsupported and prepared["dense"] is tree["dense"]
    assert qm.prepare_params(prepared)["a"] is p  # idempotent
    # one copy of the codes: the kernel planes (padded to K=256, N=256) replace the storage words
    assert [c.shape for c in p.codes] == [(256 // 16, 256), (256 // 32, 256)]
    assert all(c.dtype == jnp.uint32 for c in p.codes)
    assert not any(leaf is supported.codes for leaf in jax.tree.leaves(p))
    np.testing.assert_array_equal(np.asarray(qm.dequantize(p)), np.asarray(dequantize(supported)))
    np.testing.assert_array_equal(np.asarray(qm.dequantize(unsupported)), np.asarray(dequantize(unsupported)))
    with pytest.raises(ValueError, match="kernels"):
        qm.prepare(unsupported)


@pytest.mark.parametrize("backend", ["xla", "interpret"])
@pytest.mark.parametrize("cfg", [QuantConfig(bits=2, group_size=64), QuantConfig(bits=3, group_size=32, scheme="sym"),
                                 QuantConfig(bits=4, group_size=64, double_quant=True)],
                         ids=["2b-asym", "3b-sym", "4b-dq"])
def test_qmatmul_on_prepared_equals_the_storage_form(cfg, backend):
    qt = _qt(cfg)
    prepared = qm.prepare_params(qt)
    x = jax.random.normal(jax.random.key(4), (6, 172))
    r = jax.random.normal(jax.random.key(5), (6, 200))
    y, y_storage = qm.qmatmul(x, prepared, backend=backend), qm.qmatmul(x, qt, backend=backend)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_storage), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), _ref(x, qt), rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda x: jnp.sum(qm.qmatmul(x, prepared, backend=backend) * r))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(r @ dequantize(qt)), rtol=1e-5, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(lambda x: qm.qmatmul(x, prepared, backend=backend))(x))
    assert ("pallas_call" in jaxpr) == (backend == "interpret")


def test_block_sizes_pass_through_to_the_kernel():
    """Tolerance: float32 summation order only."""
    qt = qm.prepare_params(_qt(QuantConfig(bits=4, group_size=64)))
    x = jax.random.normal(jax.random.key(6), (5, 172))
    y_default = qm.qmatmul(x, qt, backend="interpret")
    for b in (pallas_kernels.BlockSizes(16, 32, 64), pallas_kernels.BlockSizes(32, 128, 128)):
        y = qm.qmatmul(x, qt, backend="interpret", block_sizes=b)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_default), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_m=8 is too small for the GPU kernel"):
        qm.qmatmul(x, qt, backend="interpret", block_sizes=pallas_kernels.BlockSizes(8, 128, 256))


def test_storage_level_functions_refuse_the_kernel_layout():
    prepared = qm.prepare(_qt(QuantConfig(bits=2, group_size=64)))
    for f in (dequantize, bits_per_param, QuantizedTensor.to_state_dict, QuantizedTensor.metadata,
              QuantizedTensor.dense_scales, QuantizedTensor.unpacked_codes):
        with pytest.raises(ValueError, match=r"storage layout, but this one has layout='kernel'.*prepare_params"):
            f(prepared)
    with pytest.raises(ValueError, match=r"layout='packed' is not supported; accepted: \('storage', 'kernel'\)"):
        QuantizedTensor(prepared.codes, prepared.scales, prepared.zeros, prepared.shape, prepared.config,
                        layout="packed")


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0), std=0.1)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=64), LoraConfig(rank=8, alpha=16),
                                  key=jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 100))
    lora = lora.replace({"layers": [{n: {"a": ab["a"], "b": 0.05 * jax.random.normal(next(keys), ab["b"].shape)}
                                     for n, ab in layer.items()} for layer in lora["layers"]]})
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    return frozen, lora, ids


@contextlib.contextmanager
def _backend_env(backend: str) -> Iterator[None]:
    old = os.environ.get(qm.ENV_VAR)
    os.environ[qm.ENV_VAR] = backend
    try:
        yield
    finally:
        os.environ.pop(qm.ENV_VAR) if old is None else os.environ.__setitem__(qm.ENV_VAR, old)


def _forward(params, lora, ids, backend: str | None):
    """``forward`` with qmatmul backend ``backend`` (None: "xla")."""
    return forward(params, lora, ids, CFG, backend=backend or "xla")


def _logits_and_lora_grad(frozen, lora, ids, backend: str | None):
    """Fresh jit per call, so the backend asked for is the one traced; None: dense reference."""
    def loss(l):
        if backend is None:  # reference: dequantized dense weights, no qmatmul involved
            logits = _forward(dequantize_params(frozen), l, ids, None)
        else:
            logits = _forward(jax.lax.stop_gradient(frozen), l, ids, backend)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    return np.asarray(logits), g


@pytest.fixture(scope="module")
def reference(model):
    return _logits_and_lora_grad(*model, None)


def _check_model(params, lora, ids, reference):
    ref_logits, ref_g = reference
    # the model really routes through the kernel
    assert "pallas_call" in str(jax.make_jaxpr(lambda l: _forward(params, l, ids, "interpret"))(lora))
    for backend in ("xla", "interpret"):
        logits, g = _logits_and_lora_grad(params, lora, ids, backend)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=backend)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=backend)
        assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(g))


def test_model_logits_and_lora_grads_equal_dequantized_dense(model, reference):
    _check_model(*model, reference)


def test_prepared_params_give_the_same_model(model, reference):
    """Kernel layout prepared once (prepare_params): same logits and LoRA gradients."""
    frozen, lora, ids = model
    prepared = qm.prepare_params(frozen)
    q = prepared["layers"][0]["q_proj"]
    assert isinstance(q, QuantizedTensor) and q.layout == "kernel"
    assert prepared["embed_tokens"] is frozen["embed_tokens"]
    _check_model(prepared, lora, ids, reference)
    # the prepared layout holds exactly the stored weights
    np.testing.assert_array_equal(np.asarray(qm.dequantize(prepared["layers"][1]["down_proj"])),
                                  np.asarray(dequantize(frozen["layers"][1]["down_proj"])))
    with pytest.raises(ValueError, match=r"x2d must be \[M, "):
        qm.qmatmul(jnp.zeros((2, 3)), q)


def test_environment_variable_picks_the_default_backend(model):
    """``backend=None`` at an entry point reads $APIQ_QMATMUL_BACKEND when called (no cache clearing)."""
    frozen, lora, ids = model
    with _backend_env("interpret"):
        assert qm.default_backend() == "interpret"
        traced = str(jax.make_jaxpr(lambda l: apply(frozen, l, ids, CFG))(lora))
    assert "pallas_call" in traced
    assert "pallas_call" not in str(jax.make_jaxpr(lambda l: apply(frozen, l, ids, CFG, backend="xla"))(lora))


# --- the backward keeps no dense weight -------------------------------------------------------
def _float_residuals(fn, *args) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of the floating arrays that ``jax.vjp(fn, *args)`` keeps for the backward pass."""
    _, vjp_fn = jax.vjp(fn, *args)
    return [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(vjp_fn)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("layout", ["storage", "kernel"])
def test_xla_backward_keeps_no_dense_weight(layout):
    qt = _qt(QuantConfig(bits=2, group_size=64))  # [200, 172]: groups pad K to 192
    qt = qm.prepare(qt) if layout == "kernel" else qt
    x = jax.random.normal(jax.random.key(1), (5, 172))
    dense_shapes = {(200, 172), (200, 192), (172, 200), (192, 200)}
    saved = _float_residuals(lambda x: jnp.sin(qm.qmatmul(x, qt, backend="xla")), x)
    assert not [s for s, _ in saved if s in dense_shapes], saved
    # the check can fail: plain autodiff of the same forward keeps the dequantized [200, 192] weight
    plain = _float_residuals(lambda x: jnp.sin(qm._xla_forward(x, qt)), x)
    assert [s for s, _ in plain if s in dense_shapes], plain


@pytest.mark.parametrize("layout", ["storage", "kernel"])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_xla_custom_vjp_equals_autodiff_of_the_forward(layout, dtype, rtol):
    """dx of the custom VJP == autodiff of the same dequantize-then-dot forward (the old path)."""
    qt = _qt(QuantConfig(bits=3, group_size=64))
    qt = qm.prepare(qt) if layout == "kernel" else qt
    x = jax.random.normal(jax.random.key(1), (7, 172)).astype(dtype)
    r = jax.random.normal(jax.random.key(2), (7, 200))

    def loss(f):
        return lambda x: jnp.sum(jnp.tanh(f(x, qt)) * r)

    g = jax.jit(jax.grad(loss(lambda x, qt: qm.qmatmul(x, qt, backend="xla"))))(x)
    ref = jax.jit(jax.grad(loss(qm._xla_forward)))(x)
    assert g.dtype == ref.dtype == dtype
    g, ref = np.asarray(g, np.float32), np.asarray(ref, np.float32)
    # float32: the same products summed in the same order (<= 1e-6 of the largest entry);
    # bfloat16: dx is rounded to bfloat16 either way (one ulp = 2^-8 relative)
    assert np.abs(g - ref).max() <= rtol * np.abs(ref).max()


def test_model_gradient_keeps_no_dense_weight(model):
    """The whole model's backward (no remat): no residual has the shape of a linear weight."""
    frozen, lora, ids = model
    shapes = {tuple(w.shape) for layer in frozen["layers"] for w in layer.values() if isinstance(w, QuantizedTensor)}
    shapes |= {(o, -(-i // 64) * 64) for o, i in shapes}  # the group-padded operand
    shapes |= {(i, o) for o, i in shapes}
    assert 2 * 12 not in {s for shape in shapes for s in shape}  # activations [24, .] cannot collide

    def loss(l):
        return jnp.mean(jax.nn.logsumexp(forward(jax.lax.stop_gradient(frozen), l, ids, CFG, backend="xla"), -1))

    saved = _float_residuals(loss, lora)
    assert saved and not [s for s, _ in saved if s in shapes], saved
