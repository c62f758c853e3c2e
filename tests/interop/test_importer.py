"""apiq_jax/interop/importer.py: exact recovery of codes from fake-quantized weights, official-ApiQ-style
and GPTQ directories in, round trips bit-identical, and every error case named."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from apiq_jax.interop.export import export_model
from apiq_jax.interop.importer import import_apiq, import_gptq, recover_quantized
from apiq_jax.interop.peft_io import save_adapter
from apiq_jax.models import load_quantized, save_pretrained
from apiq_jax.models.quantized import dequantize_params
from apiq_jax.quant import QuantConfig, dequantize, fake_quantize, quantize


def assert_same_tree(a, b):
    """Same structure, static metadata, dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bits, scheme", [(2, "asym"), (3, "asym"), (4, "sym"), (2, "sym"), (8, "asym")])
def test_recover_gives_back_the_quantizer_state(bits, scheme):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((48, 100)) * 0.05).astype(np.float32)  # 100 = 3 groups of 32 + a padded one
    cfg = QuantConfig(bits=bits, group_size=32, scheme=scheme)
    qt = quantize(w, cfg)
    fake = np.asarray(fake_quantize(w, cfg))
    got = recover_quantized(fake, cfg, "layers.0.q_proj")
    np.testing.assert_array_equal(np.asarray(dequantize(got)), fake)  # the weight, bit for bit
    assert_same_tree(got, qt)  # and, where every group spans its code range, the same codes, scales, zeros


def test_recover_groups_that_do_not_span_the_code_range():
    cfg = QuantConfig(bits=3, group_size=8)
    s = np.float32(np.float16(0.013))
    w = np.array([[0, 1, 2, 1, 0, 2, 2, 1], [-2, -1, 0, 1, 1, 0, -1, -2], [0] * 8, [3] * 8], np.float32) * s
    got = recover_quantized(w, cfg, "x")
    np.testing.assert_array_equal(np.asarray(dequantize(got)), w)


def test_more_values_than_codes_is_named():
    w = (np.random.default_rng(0).standard_normal((8, 64)) * 0.05).astype(np.float32)
    fake = np.array(fake_quantize(w, QuantConfig(bits=2, group_size=32)))
    fake[5, 40] += 1e-3  # a fifth value in row 5, group 1
    with pytest.raises(ValueError, match=r"layers.3.up_proj: row 5, group 1 holds 5 distinct values, more than "
                                         r"2\^2 = 4; the base was not fake-quantized with bits=2, group size 32"):
        recover_quantized(fake, QuantConfig(bits=2, group_size=32), "layers.3.up_proj")
    with pytest.raises(ValueError, match="holds .* distinct values"):  # wrong settings: 4-bit base read as 2-bit
        recover_quantized(np.asarray(fake_quantize(w, QuantConfig(bits=4, group_size=32))),
                          QuantConfig(bits=2, group_size=32), "x")


def official_apiq_dir(path, frozen, lora, config):
    """What the official ApiQ code writes: the fake-quantized base as float32 HF weights + apiq_init adapter."""
    save_pretrained(dequantize_params(frozen), path, config, dtype="float32")
    save_adapter(path / "apiq_init", lora)
    return path


@pytest.mark.parametrize("bits, scheme", [(2, "asym"), (3, "sym")])
def test_import_official_apiq_directory_round_trips(quantized, tiny, tmp_path, bits, scheme):
    _, config, _ = tiny
    _, frozen, lora = quantized(bits, scheme)
    src = official_apiq_dir(tmp_path / "apiq", frozen, lora, config)
    res = import_apiq(src, tmp_path / "q", QuantConfig(bits=bits, group_size=32, scheme=scheme))
    assert res["quantized_linears"] == 14 and res["lora_rank"] == 4
    f2, l2, _, _ = load_quantized(tmp_path / "q")
    assert_same_tree(f2, frozen)
    assert_same_tree(l2, lora) and l2.config == lora.config


def test_peft_export_then_import_is_bit_identical(quantized, tmp_path):
    qdir, frozen, lora = quantized(2, "asym")
    export_model(qdir, tmp_path / "p", "peft")
    import_apiq(tmp_path / "p", tmp_path / "q", QuantConfig(bits=2, group_size=32))
    f2, l2, _, _ = load_quantized(tmp_path / "q")
    assert_same_tree(f2, frozen)
    assert_same_tree(l2, lora)


@pytest.mark.parametrize("bits, scheme, fmt", [(2, "asym", "gptq"), (3, "sym", "gptq"), (2, "asym", "gptq_v2")])
def test_gptq_export_then_import_is_bit_identical(quantized, tmp_path, bits, scheme, fmt):
    qdir, frozen, lora = quantized(bits, scheme)
    export_model(qdir, tmp_path / "g", "gptq", checkpoint_format=fmt)
    res = import_gptq(tmp_path / "g", tmp_path / "q")
    assert res["checkpoint_format"] == fmt
    f2, l2, _, meta = load_quantized(tmp_path / "q")
    assert_same_tree(f2, frozen)
    assert_same_tree(l2, lora)
    assert meta["imported_from"] == "gptq"


def test_gptq_v1_and_v2_zero_conventions_read_alike(quantized, tmp_path):
    """The same model written with both conventions imports to the same tensors (v1 zeros stored minus one)."""
    from safetensors.numpy import load_file

    from apiq_jax.interop.gptq_format import unpack_rows

    qdir, frozen, _ = quantized(2, "asym")
    for fmt in ("gptq", "gptq_v2"):
        export_model(qdir, tmp_path / fmt, "gptq", checkpoint_format=fmt)
    key = "model.layers.0.mlp.up_proj.qzeros"
    z1 = unpack_rows(load_file(str(tmp_path / "gptq" / "model.safetensors"))[key].T, 2)
    z2 = unpack_rows(load_file(str(tmp_path / "gptq_v2" / "model.safetensors"))[key].T, 2)
    np.testing.assert_array_equal(z1 + 1, z2)
    np.testing.assert_array_equal(z2, np.asarray(frozen["layers"][0]["up_proj"].zeros))


def test_gptq_without_adapter_gets_a_fresh_lora(quantized, tmp_path):
    import shutil

    from apiq_jax.lora import LoraConfig

    qdir, frozen, _ = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    shutil.rmtree(tmp_path / "g" / "apiq_init")
    import_gptq(tmp_path / "g", tmp_path / "q", lora_config=LoraConfig(rank=8, alpha=16.0))
    f2, l2, _, _ = load_quantized(tmp_path / "q")
    assert_same_tree(f2, frozen)
    assert l2.config.rank == 8 and not np.asarray(l2.layers[0]["q_proj"].b).any()  # QLoRA init: b = 0


def test_import_errors_are_named(quantized, tiny, tmp_path):
    _, config, params = tiny
    qdir, frozen, lora = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    cfg_path = tmp_path / "g" / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["quantization_config"]["desc_act"] = True
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="desc_act \\(act-order\\) GPTQ checkpoints cannot be imported"):
        import_gptq(tmp_path / "g", tmp_path / "q1")
    save_pretrained(dequantize_params(frozen), tmp_path / "noadapter", config, dtype="float32")
    with pytest.raises(FileNotFoundError, match="no peft adapter in .*apiq_init/adapter_config.json"):
        import_apiq(tmp_path / "noadapter", tmp_path / "q2", QuantConfig(bits=2, group_size=32))
    with pytest.raises(ValueError, match="no quantization_config with quant_method 'gptq'"):
        import_gptq(tmp_path / "noadapter", tmp_path / "q3")
    from tests.interop.helpers import random_lora

    small = {**params, "layers": [{**layer, "q_proj": np.zeros((64, 64), np.float32)[:, :32]}
                                  for layer in params["layers"]]}
    save_adapter(tmp_path / "noadapter" / "apiq_init", random_lora(small, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"layers.0.q_proj: got a \(32, 4\).*expected a \(64, 4\)"):
        import_apiq(tmp_path / "noadapter", tmp_path / "q4", QuantConfig(bits=2, group_size=32))
