"""Saved quantized-model directories: exact round trip, packed codes on disk, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.lora import LoraConfig
from apiq_jax.models import (
    ModelConfig,
    apply,
    init_params,
    load_config,
    load_quantized,
    quantize_model,
    save_quantized,
)
from apiq_jax.models.quantized_io import FROZEN_FILE, LORA_FILE, META_FILE, is_quantized_dir
from apiq_jax.quant import QuantConfig, QuantizedTensor

CFG = ModelConfig("Qwen2ForCausalLM", 80, 64, 100, 2, 4, 2, 16, qkv_bias=True, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
LCFG = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))


def _build(qcfg: QuantConfig, seed: int = 0):
    params = init_params(CFG, jax.random.key(seed), std=0.1)
    frozen, lora = quantize_model(params, qcfg, LCFG, key=jax.random.key(seed + 1))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-trivial b
    return frozen, lora


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "qcfg",
    [
        QuantConfig(bits=2, group_size=64),
        QuantConfig(bits=3, group_size=32, scheme="sym", scale_dtype="float32"),
        QuantConfig(bits=4, group_size=64, scheme="nf", double_quant=True),
        QuantConfig(bits=4, group_size=64, scheme="asym", double_quant=True),
    ],
    ids=["asym2", "sym3", "nf4-dq", "asym4-dq"],
)
def test_roundtrip_is_exact(tmp_path, qcfg):
    frozen, lora = _build(qcfg)
    meta = {"method": "rtn", "calib": {"samples": 0}}
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, meta)
    assert is_quantized_dir(out)
    f2, l2, cfg2, meta2 = load_quantized(out)
    assert cfg2 == CFG and l2.config == LCFG and meta2 == meta
    _leaves_equal(frozen, f2)
    _leaves_equal(lora, l2)
    qt = f2["layers"][1]["down_proj"]
    assert isinstance(qt, QuantizedTensor) and qt.config == qcfg and qt.shape == (64, 100)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 80, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(apply(frozen, lora, ids, CFG)),
        np.asarray(apply(f2, l2, ids, cfg2)),
    )


def test_files_and_packed_codes_on_disk(tmp_path):
    from safetensors import safe_open

    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {"note": "x"})
    assert {p.name for p in out.iterdir()} == {"config.json", FROZEN_FILE, LORA_FILE, META_FILE}
    with safe_open(str(out / FROZEN_FILE), framework="numpy") as f:
        keys = set(f.keys())
        codes = f.get_slice("layers.0.down_proj.codes")
        assert codes.get_dtype() == "U32"
        # 100 inputs -> 2 groups of 64 = 128 codes of 2 bits = 8 words per row (packed)
        assert codes.get_shape() == [64, 8]
        assert f.get_slice("layers.0.q_proj.zeros").get_dtype() == "I16"
    assert {"embed_tokens", "norm", "layers.0.input_layernorm", "layers.0.q_proj_bias",
            "layers.1.v_proj.scales"} <= keys
    assert "lm_head" not in keys  # tied
    with safe_open(str(out / LORA_FILE), framework="numpy") as f:
        assert set(f.keys()) == {f"layers.{i}.{n}.{ab}" for i in range(2) for n in LCFG.targets for ab in "ab"}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["quantized"]["layers.0.down_proj"]["shape"] == [64, 100]
    assert meta["quantized"]["layers.0.down_proj"]["config"]["bits"] == 2
    assert meta["lora_config"] == {"rank": 4, "alpha": 8.0, "targets": list(LCFG.targets)}
    # config.json is a normal HF config
    assert load_config(out) == CFG


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {}, tokenizer_source=src)
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "tokenizer_config.json").is_file()


def test_without_lora(tmp_path):
    frozen, _ = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, None, CFG, {})
    f2, l2, _, _ = load_quantized(out)
    assert l2 is None
    _leaves_equal(frozen, f2)


def test_errors(tmp_path):
    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    with pytest.raises(ValueError, match="lora must be an apiq_jax.lora.Lora or None, got dict"):
        save_quantized(tmp_path / "a", frozen, dict(lora.factors), CFG, {})
    with pytest.raises(ValueError, match="JSON"):
        save_quantized(tmp_path / "b", frozen, lora, CFG, {"x": object()})
    other = ModelConfig("Qwen2ForCausalLM", 80, 64, 100, 3, 4, 2, 16, qkv_bias=True, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="missing"):
        save_quantized(tmp_path / "c", frozen, lora, other, {})

    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="apiq_meta.json not found"):
        load_quantized(tmp_path / "plain")

    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {})
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version=99"):
        load_quantized(out)
    (out / META_FILE).write_text(json.dumps(meta))
    (out / LORA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lora.safetensors not found"):
        load_quantized(out)
    (out / FROZEN_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*frozen.safetensors"):
        load_quantized(out)
