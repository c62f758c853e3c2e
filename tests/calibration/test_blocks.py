"""Block helpers (apiq_jax/calibration/blocks.py): the streams against the recorded official run,
the one freeze route, the float32 view of a frozen layer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.calibration import blocks
from apiq_jax.calibration.blocks import (
    as_float32,
    block_error,
    embed_ids,
    fake_quant_layer,
    float32_view,
    freeze_layer,
    layer_idx_arg,
    run_block,
    samples_per_pass,
    stream_error,
    with_quantized,
)
from apiq_jax.lora import LINEARS
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantizedTensor, dequantize, init_clip, quantize
from tests.calibration.conftest import TINY_QCFG, golden_start_state


def test_block_inputs_and_targets(golden):
    """Embeddings, full-precision targets, aug targets and the first fake-quantized output."""
    G = golden
    g, cfg, qcfg = G["g"], G["cfg"], G["qcfg"]
    x = embed_ids(G["params"], g["calib_ids"], cfg)
    np.testing.assert_array_equal(np.asarray(x), g["block0/quant_in"])
    fp = x
    for i in range(cfg.num_hidden_layers):
        layer = G["params"]["layers"][i]
        q_in = jnp.asarray(g[f"block{i}/quant_in"])
        fp = run_block(layer, fp, cfg)
        np.testing.assert_allclose(np.asarray(fp), g[f"block{i}/fp_target"], rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.asarray(run_block(layer, q_in, cfg)), g[f"block{i}/fp2_target"],
                                   rtol=0, atol=2e-6)
        train = golden_start_state(G, i)
        out = run_block(fake_quant_layer(layer, train["clip"], qcfg), q_in[:1], cfg, train["lora"])[0]
        np.testing.assert_allclose(np.asarray(out), g[f"block{i}/quant_out_step0"], rtol=0, atol=2e-6)


def test_freeze_layer_is_quantize_per_linear(tiny):
    _, params, _ = tiny
    layer = params["layers"][0]
    clip = init_clip(layer["up_proj"].shape, TINY_QCFG, 1.0)
    frozen = freeze_layer(layer, TINY_QCFG, {"up_proj": clip})
    for n in LINEARS:
        want = quantize(layer[n], TINY_QCFG, clip=clip if n == "up_proj" else None)
        np.testing.assert_array_equal(np.asarray(frozen[n].codes), np.asarray(want.codes))
        np.testing.assert_array_equal(np.asarray(frozen[n].scales), np.asarray(want.scales))
    assert frozen["input_layernorm"] is layer["input_layernorm"]
    # already frozen linears are kept as they are (the same objects)
    again = freeze_layer(frozen, TINY_QCFG)
    assert all(again[n] is frozen[n] for n in LINEARS)
    # only the targets
    part = freeze_layer(layer, TINY_QCFG, targets=("q_proj",))
    assert isinstance(part["q_proj"], QuantizedTensor) and part["k_proj"] is layer["k_proj"]


def test_freeze_layer_names_the_linear_it_refuses(tiny):
    _, params, _ = tiny
    layer = dict(params["layers"][0])
    layer["v_proj"] = layer["v_proj"].at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layers\.1\.v_proj: weight contains 1 non-finite"):
        freeze_layer(layer, TINY_QCFG, where="layers.1")


def test_float32_view_reuses_the_codes(tiny):
    _, params, _ = tiny
    layer = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["layers"][0])
    frozen = freeze_layer(layer, TINY_QCFG)
    view = float32_view(frozen)
    for n in LINEARS:
        assert frozen[n].dtype == "bfloat16" and view[n].dtype == "float32"
        assert view[n].codes is frozen[n].codes and view[n].scales is frozen[n].scales
        # the view equals quantizing the float32 copy of the weight (no second rounding)
        want = quantize(as_float32(layer)[n], TINY_QCFG)
        np.testing.assert_array_equal(np.asarray(dequantize(view[n])), np.asarray(dequantize(want)))
    assert view["input_layernorm"].dtype == jnp.float32


def test_layer_idx_is_passed_only_for_mixed_attention():
    base = ModelConfig("LlamaForCausalLM", 64, 32, 64, 2, 2, 1, 16)
    assert layer_idx_arg(base, 1) is None
    mixed = dataclasses.replace(base, sliding_window=4, layer_types=("sliding_attention", "full_attention"))
    assert layer_idx_arg(mixed, 1) == 1
    uniform = dataclasses.replace(base, sliding_window=4, layer_types=("sliding_attention",) * 2)
    assert layer_idx_arg(uniform, 1) is None


# --- caches: in place, any dtype, errors on the device ------------------------------------------
def _reference_block(layer, xs, cfg):
    """float64 numpy would need a whole numpy Llama; the per-sample jax block in float32 is the reference."""
    from apiq_jax.models.llama import block_forward

    return np.stack([np.asarray(block_forward(layer, jnp.asarray(x, jnp.float32)[None], cfg)[0]) for x in xs])


def test_run_block_in_place_equals_a_fresh_buffer(tiny):
    cfg, params, ids = tiny
    layer = as_float32(params["layers"][0])
    xs = jax.random.normal(jax.random.key(0), (3, ids.shape[1], cfg.hidden_size))
    want = _reference_block(layer, np.asarray(xs), cfg)
    fresh = run_block(layer, xs, cfg)
    assert not xs.is_deleted()
    np.testing.assert_allclose(np.asarray(fresh), want, rtol=1e-6, atol=1e-6)
    inplace = run_block(layer, jnp.array(xs), cfg, consume=True)
    np.testing.assert_array_equal(np.asarray(inplace), np.asarray(fresh))
    donated = jnp.array(xs)
    run_block(layer, donated, cfg, consume=True)
    assert donated.is_deleted()  # its buffer now holds the outputs: no second cache


def test_samples_per_pass_divides_the_samples_within_the_token_budget():
    assert blocks.PASS_TOKENS == 1024
    assert samples_per_pass(32, 256) == 4 and samples_per_pass(128, 2048) == 1 and samples_per_pass(128, 4096) == 1
    assert samples_per_pass(6, 256) == 3  # 4 does not divide 6
    assert samples_per_pass(7, 128) == 7 and samples_per_pass(7, 200) == 1  # 5 x 200 fit, but 5 does not divide 7
    assert samples_per_pass(2, 24) == 2 and samples_per_pass(1, 10) == 1


def test_several_samples_per_pass_equal_one_at_a_time(tiny, monkeypatch):
    """Two samples per iteration over three iterations (and the errors' per-sample sums) against one at a time."""
    cfg, params, ids = tiny
    layer = as_float32(params["layers"][0])
    xs = jax.random.normal(jax.random.key(4), (6, ids.shape[1], cfg.hidden_size))
    targets = xs + 0.1 * jax.random.normal(jax.random.key(5), xs.shape)
    outs, errs = {}, {}
    for tokens in (2 * ids.shape[1], 1):
        monkeypatch.setattr(blocks, "PASS_TOKENS", tokens)
        jax.clear_caches()  # the loop's step is fixed when the program is traced
        assert samples_per_pass(6, ids.shape[1]) == (2 if tokens > 1 else 1)
        outs[tokens], errs[tokens] = np.asarray(run_block(layer, xs, cfg)), block_error(layer, xs, targets, cfg)
    want = _reference_block(layer, np.asarray(xs), cfg)
    np.testing.assert_allclose(outs[2 * ids.shape[1]], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[2 * ids.shape[1]], outs[1], rtol=0, atol=1e-6)
    assert errs[2 * ids.shape[1]] == pytest.approx(errs[1], rel=1e-6)


def test_sixteen_bit_cache_computes_in_float32(tiny):
    cfg, params, ids = tiny
    layer = as_float32(params["layers"][1])
    xs = jax.random.normal(jax.random.key(1), (2, ids.shape[1], cfg.hidden_size))
    out = run_block(layer, xs.astype(jnp.bfloat16), cfg)
    assert out.dtype == jnp.bfloat16
    want = _reference_block(layer, np.asarray(xs.astype(jnp.bfloat16).astype(jnp.float32)), cfg)
    # the only 16-bit step is the rounding of the stored output (bfloat16: 8 significant bits)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2**-8, atol=1e-6)


def test_block_and_stream_errors_match_float64(tiny):
    cfg, params, ids = tiny
    layer = as_float32(params["layers"][0])
    xs = jax.random.normal(jax.random.key(2), (3, ids.shape[1], cfg.hidden_size))
    targets = xs + 0.1 * jax.random.normal(jax.random.key(3), xs.shape)
    ys = _reference_block(layer, np.asarray(xs), cfg).astype(np.float64)
    t = np.asarray(targets, np.float64)
    want = float(np.sum((t - ys) ** 2) / np.sum(t * t))
    assert block_error(layer, xs, targets, cfg) == pytest.approx(want, rel=1e-5)
    assert stream_error(targets, jnp.asarray(ys, jnp.float32)) == pytest.approx(want, rel=1e-5)
    assert stream_error(targets, targets) == 0.0


def test_with_quantized_keeps_norms_in_their_dtype(tiny):
    cfg, params, _ = tiny
    layer = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params["layers"][0].items()}
    qt = freeze_layer(as_float32(layer), TINY_QCFG, dtype="bfloat16")
    frozen = with_quantized(layer, {n: qt[n] for n in LINEARS})
    assert frozen["input_layernorm"].dtype == jnp.bfloat16 and list(frozen) == list(layer)
    assert all(frozen[n].dtype == "bfloat16" for n in LINEARS)
    # codes from the float32 view of 16-bit weights equal those of the 16-bit weights themselves
    direct = freeze_layer(layer, TINY_QCFG)
    for n in LINEARS:
        np.testing.assert_array_equal(np.asarray(frozen[n].codes), np.asarray(direct[n].codes))
