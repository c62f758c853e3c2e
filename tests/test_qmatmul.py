"""apiq_jax.qmatmul: backend selection, fallbacks, gradients and the model-level forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from apiq_jax import qmatmul as qm
from apiq_jax.lora import LoraConfig
from apiq_jax.models import (
    ModelConfig,
    dequantize_params,
    forward,
    init_params,
    quantize_model,
)
from apiq_jax.quant import QuantConfig, dequantize, quantize

CFG = ModelConfig("LlamaForCausalLM", 96, 64, 172, 2, 4, 2, 16, tie_word_embeddings=False)


def _qt(cfg: QuantConfig, n: int = 200, k: int = 172, seed: int = 0):
    return quantize(jax.random.normal(jax.random.key(seed), (n, k), jnp.float32), cfg)


def _ref(x: jnp.ndarray, qt) -> np.ndarray:
    w = dequantize(qt).astype(x.dtype)
    return np.asarray(jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))


def test_backend_default_env_and_context(monkeypatch):
    monkeypatch.delenv(qm.ENV_VAR, raising=False)
    assert qm.default_backend() == "auto"
    assert qm.resolve_backend(None) == ("xla" if jax.default_backend() == "cpu" else "pallas")
    monkeypatch.setenv(qm.ENV_VAR, "interpret")
    assert qm.default_backend() == "interpret"
    with qm.use_backend("xla"):
        assert qm.default_backend() == "xla"  # the context manager beats the env var
        with qm.use_backend("interpret"):
            assert qm.resolve_backend(None) == "interpret"
        assert qm.default_backend() == "xla"
    assert qm.default_backend() == "interpret"
    monkeypatch.setenv(qm.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"'cuda' \(from \$APIQ_QMATMUL_BACKEND\).*accepted: \('auto', 'pallas', 'xla', 'interpret'\)"):
        qm.default_backend()


def test_unknown_backend_and_bad_shapes_raise():
    qt = _qt(QuantConfig(bits=2, group_size=64))
    with pytest.raises(ValueError, match=r"backend 'triton'.*accepted: \('auto', 'pallas', 'xla', 'interpret'\)"):
        qm.qmatmul(jnp.ones((2, 172)), qt, backend="triton")
    with pytest.raises(ValueError, match="accepted"):
        with qm.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match=r"x2d must be \[M, 172\]"):
        qm.qmatmul(jnp.ones((2, 171)), qt)
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


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0), std=0.1)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=64), LoraConfig(rank=8, alpha=16),
                                  key=jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 100))
    lora = {"layers": [{n: {"a": ab["a"], "b": 0.05 * jax.random.normal(next(keys), ab["b"].shape)}
                        for n, ab in layer.items()} for layer in lora["layers"]]}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    return frozen, lora, ids


def _logits_and_lora_grad(frozen, lora, ids, backend: str | None):
    """Fresh jit per call, so the backend in force is the one traced."""
    def loss(l):
        logits = forward(jax.lax.stop_gradient(frozen), l, ids, CFG, lora_scale=2.0)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    with qm.use_backend(backend or "xla"):
        if backend is None:  # reference: dequantized dense weights, no qmatmul involved
            def loss(l):  # noqa: F811
                logits = forward(dequantize_params(frozen), l, ids, CFG, lora_scale=2.0)
                return jnp.mean(jax.nn.logsumexp(logits, -1)), logits
        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    return np.asarray(logits), g


def test_model_logits_and_lora_grads_equal_dequantized_dense(model):
    frozen, lora, ids = model
    ref_logits, ref_g = _logits_and_lora_grad(frozen, lora, ids, None)
    with qm.use_backend("interpret"):  # the model really routes through the kernel
        assert "pallas_call" in str(jax.make_jaxpr(lambda l: forward(frozen, l, ids, CFG))(lora))
    for backend in ("xla", "interpret"):
        logits, g = _logits_and_lora_grad(frozen, lora, ids, backend)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=backend)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=backend)
        assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(g))


def test_prepared_params_give_the_same_model(model):
    """Kernel layout prepared once (prepare_params): same logits and LoRA gradients."""
    frozen, lora, ids = model
    prepared = qm.prepare_params(frozen)
    assert isinstance(prepared["layers"][0]["q_proj"], pallas_kernels.PreparedWeights)
    assert prepared["embed_tokens"] is frozen["embed_tokens"]
    ref_logits, ref_g = _logits_and_lora_grad(frozen, lora, ids, None)
    for backend in ("xla", "interpret"):
        logits, g = _logits_and_lora_grad(prepared, lora, ids, backend)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=backend)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=backend)
    # the prepared layout holds exactly the stored weights
    qt = frozen["layers"][1]["down_proj"]
    np.testing.assert_array_equal(np.asarray(pallas_kernels.dequantize_prepared(prepared["layers"][1]["down_proj"])),
                                  np.asarray(dequantize(qt)))
    with pytest.raises(ValueError, match=r"x2d must be \[M, "):
        qm.qmatmul(jnp.zeros((2, 3)), prepared["layers"][0]["q_proj"])
