"""What ApiQ-bw and ApiQ-lw share (apiq_jax/calibration/apiq.py): the starting point of every block
and the assembled result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import ApiQOptions, apiq_bw, apiq_lw, cloq_init, loftq_init
from apiq_jax.calibration.apiq import ApiQContext, InitialLora
from apiq_jax.lora import LINEARS, init_lora
from apiq_jax.quant import ClipLogits, QuantConfig, QuantizedTensor, dequantize, fake_quantize, init_clip, nf_codebook
from tests.calibration import resume_worker as W


def test_every_block_starts_from_clip_init_and_the_initial_lora():
    params, _ = W.tiny_setup()
    lora0 = init_lora(params, W.LCFG, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    ctx = ApiQContext(W.CFG, W.QCFG, ApiQOptions(clip_init=2.5), InitialLora.of(lora0))
    state = ctx.start_state(1, params["layers"][1])
    assert list(state["clip"]) == list(LINEARS)
    for n in LINEARS:
        clip = state["clip"][n]
        out_f, in_f = params["layers"][1][n].shape
        assert isinstance(clip, ClipLogits) and clip.gamma.shape == (out_f, -(-in_f // 32))
        np.testing.assert_array_equal(np.asarray(clip.beta), 2.5)
    assert state["lora"]["q_proj"]["a"].dtype == jnp.float32  # trained in float32
    np.testing.assert_array_equal(np.asarray(state["lora"]["q_proj"]["a"]),
                                  np.asarray(lora0["layers"][1]["q_proj"]["a"], np.float32))


def test_result_keeps_the_dtypes_and_the_typed_clip_logits():
    params, ids = W.tiny_setup()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lora0 = init_lora(params, W.LCFG, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    res = apiq_bw(params, W.CFG, ids[:2], W.QCFG, W.LCFG, lora_init=lora0.factors, options=ApiQOptions(epochs=1))
    for i, layer in enumerate(res.params["layers"]):
        assert layer["input_layernorm"] is params["layers"][i]["input_layernorm"]  # shared, not copied
        for n in LINEARS:
            assert isinstance(layer[n], QuantizedTensor) and layer[n].dtype == "bfloat16"
            # the initial LoRA's dtype (lora_from_factors returns float32 factors by default)
            assert res.lora["layers"][i][n]["b"].dtype == jnp.float32
            assert isinstance(res.extras["clip"]["layers"][i][n], ClipLogits)
    assert res.params["embed_tokens"] is params["embed_tokens"]
    assert res.report.options == ApiQOptions(epochs=1).to_dict()
    assert res.report.extra == {"resumed_from_block": 0, "work_dir": None}


def _nf_reference(w: np.ndarray, clip: ClipLogits, bits: int, group: int) -> np.ndarray:
    """float64 NF fake quantization with learned clipping: each group's scale is
    ``max(sigmoid(gamma) max, |sigmoid(beta) min|)`` (stored in float16, the default scale dtype), each
    weight the nearest codebook level times it."""
    book = np.asarray(nf_codebook(bits), np.float64)
    sig = lambda v: 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))  # noqa: E731
    g = w.reshape(w.shape[0], -1, group).astype(np.float64)
    scale = np.maximum(sig(clip.gamma)[..., None] * g.max(-1, keepdims=True),
                       np.abs(sig(clip.beta)[..., None] * g.min(-1, keepdims=True))).astype(np.float16).astype(np.float64)
    v = g / np.where(scale == 0, 1.0, scale)
    return (book[np.abs(v[..., None] - book).argmin(-1)] * scale).reshape(w.shape)


@pytest.mark.parametrize("fn", [apiq_bw, apiq_lw])
def test_normalfloat_grid(fn):
    """ApiQ on the NF grid: every stored linear is its group absmax (shrunk by the learned clipping logits)
    times the nearest NF level, as a float64 reference computes it, and training lowers each block's
    activation error from its starting point."""
    params, ids = W.tiny_setup()
    qcfg = QuantConfig(2, 32, scheme="nf")
    res = fn(params, W.CFG, ids, qcfg, W.LCFG, key=jax.random.PRNGKey(0), options=ApiQOptions(epochs=3))
    assert res.report.quant_config["scheme"] == "nf"
    for i, layer in enumerate(res.params["layers"]):
        for n in LINEARS:
            assert isinstance(layer[n], QuantizedTensor) and layer[n].config.scheme == "nf" and layer[n].zeros is None
            clip = res.extras["clip"]["layers"][i][n]
            assert np.abs(np.asarray(clip.gamma) - 4.0).max() > 1e-4  # the clipping was trained
            want = _nf_reference(np.asarray(params["layers"][i][n]), clip, 2, 32)
            got = np.asarray(dequantize(layer[n]), np.float64)
            # float32 scales: a weight within rounding of a level midpoint may take the other level
            assert np.mean(np.abs(got - want) > 1e-5 * np.abs(want).max()) < 1e-3, (i, n)
    for b in res.report.blocks:
        assert b.error_after < b.error_before, b


# --- ApiQOptions.lora_init: ApiQ started from LoftQ's or CLoQ's closed form ------------------------
_RTN_CLIP = 20.0  # sigmoid(20) == 1.0 in float32: ApiQ's starting quantizer is plain round-to-nearest


def _same_model(res, ref, atol_rel):
    for i, layer in enumerate(res.params["layers"]):
        for n in LINEARS:
            np.testing.assert_array_equal(np.asarray(layer[n].codes), np.asarray(ref.params["layers"][i][n].codes))
            got = np.asarray(res.lora["layers"][i][n]["a"] @ res.lora["layers"][i][n]["b"])
            want = np.asarray(ref.lora["layers"][i][n]["a"] @ ref.lora["layers"][i][n]["b"])
            np.testing.assert_allclose(got, want, rtol=0, atol=atol_rel * np.abs(want).max())


@pytest.mark.parametrize("fn", [apiq_bw, apiq_lw])
def test_lora_init_loftq_at_zero_epochs_is_loftq(fn):
    """0 epochs from the LoftQ start, RTN clipping: LoftQ's (one iteration) codes and factors, bit for bit."""
    params, ids = W.tiny_setup()
    qcfg = QuantConfig(2, 32, scheme="asym")
    ref = loftq_init(params, W.CFG, ids, qcfg, W.LCFG, key=None, num_iter=1)
    res = fn(params, W.CFG, ids, qcfg, W.LCFG, options=ApiQOptions(epochs=0, clip_init=_RTN_CLIP, lora_init="loftq"))
    _same_model(res, ref, 0.0)
    assert res.report.options["lora_init"] == "loftq"
    np.testing.assert_allclose(res.report.errors_after, ref.report.errors_after, rtol=1e-5)


@pytest.mark.parametrize("fn", [apiq_bw, apiq_lw])
def test_lora_init_cloq_at_zero_epochs_is_cloq(fn):
    """0 epochs from the CLoQ start: CLoQ's solution with X from the quantized stream (sequential=True)."""
    params, ids = W.tiny_setup()
    qcfg = QuantConfig(2, 32, scheme="asym")
    ref = cloq_init(params, W.CFG, ids, qcfg, W.LCFG, key=None, sequential=True)
    res = fn(params, W.CFG, ids, qcfg, W.LCFG, options=ApiQOptions(epochs=0, clip_init=_RTN_CLIP, lora_init="cloq"))
    _same_model(res, ref, 1e-5)  # the same float32 program up to XLA fusion differences
    np.testing.assert_allclose(res.report.errors_after, ref.report.errors_after, rtol=1e-4)


def test_lora_init_fits_the_clipped_start_and_then_trains():
    """With ApiQ's own clip_init the factors fit W - Q0 (Q0 clipped at sigmoid(4)); the fitted start has a
    lower error than the reference's in every block, and training goes on from it."""
    params, ids = W.tiny_setup()
    default = apiq_bw(params, W.CFG, ids, W.QCFG, W.LCFG, key=jax.random.PRNGKey(0), options=ApiQOptions(epochs=1))
    for kind in ("loftq", "cloq"):
        res = apiq_bw(params, W.CFG, ids, W.QCFG, W.LCFG, options=ApiQOptions(epochs=1, lora_init=kind))
        for b, d in zip(res.report.blocks, default.report.blocks):
            assert b.error_before < d.error_before, (kind, b.index, b.error_before, d.error_before)
            assert len(b.loss_curve) == ids.shape[0]  # one epoch of batch-1 steps
    w = np.asarray(params["layers"][0]["v_proj"], np.float64)
    q0 = np.asarray(fake_quantize(params["layers"][0]["v_proj"], W.QCFG, clip=init_clip(w.shape, W.QCFG)), np.float64)
    u, s, vt = np.linalg.svd((w - q0).T)
    want = (u[:, :4] * s[:4]) @ vt[:4]
    ctx = ApiQContext(W.CFG, W.QCFG, ApiQOptions(lora_init="loftq"),
                      InitialLora.of(init_lora(params, W.LCFG, jax.random.PRNGKey(0))))
    layer = {k: jnp.asarray(v, jnp.float32) for k, v in params["layers"][0].items()}
    lora = ctx.fitted_lora(0, layer, ctx.start_state(0, layer), None, None)
    got = W.LCFG.scale * np.asarray(lora["v_proj"]["a"] @ lora["v_proj"]["b"], np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_lora_init_is_in_the_work_dir_fingerprint(tmp_path):
    """A work directory started with one lora_init is not resumed with another."""
    params, ids = W.tiny_setup()
    apiq_bw(params, W.CFG, ids, W.QCFG, W.LCFG, options=ApiQOptions(epochs=0, lora_init="loftq"), work_dir=tmp_path)
    with pytest.raises(ValueError, match=r"differs in: .*options"):
        apiq_bw(params, W.CFG, ids, W.QCFG, W.LCFG, options=ApiQOptions(epochs=0, lora_init="cloq"),
                work_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lora_init= factors and options.lora_init='cloq' both given"):
        apiq_bw(params, W.CFG, ids, W.QCFG, W.LCFG, options=ApiQOptions(lora_init="cloq"),
                lora_init=init_lora(params, W.LCFG, jax.random.PRNGKey(0)).factors)
