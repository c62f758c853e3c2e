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
from tests.interop.helpers import copy_without_weights, shard_gptq_dir


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


# --- sharded checkpoints, bfloat16 / float32 scales and dense tensors -------------------------------------
def test_sharded_gptq_imports_bit_identically_to_the_single_file(quantized, tmp_path):
    from safetensors.numpy import save_file

    qdir, frozen, lora = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    sharded, names = shard_gptq_dir(tmp_path / "g", tmp_path / "s")
    # a stray file the index does not name, holding a conflicting tensor: it must not be read
    save_file({"model.embed_tokens.weight": np.zeros((512, 64), np.float32)}, str(sharded / "stale.safetensors"))
    one = import_gptq(tmp_path / "g", tmp_path / "q1")
    res = import_gptq(sharded, tmp_path / "q2")
    assert one["files"] == 1 and res["files"] == 3 and res["quantized_linears"] == 14
    f2, l2, _, _ = load_quantized(tmp_path / "q2")
    assert_same_tree(f2, frozen)
    assert_same_tree(l2, lora)
    for f in ("frozen.safetensors", "lora.safetensors", "apiq_meta.json"):  # the same files, byte for byte
        assert (tmp_path / "q1" / f).read_bytes() == (tmp_path / "q2" / f).read_bytes(), f
    # without the index every *.safetensors is read: the stray duplicate is refused, not silently taken
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"tensor 'model.embed_tokens.weight' is in both model-\d+-of-00003"
                                         r".safetensors and stale.safetensors"):
        import_gptq(sharded, tmp_path / "q3")
    assert not (tmp_path / "q3").exists()


def test_sharded_gptq_index_errors_are_named(quantized, tmp_path):
    qdir, _, _ = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    sharded, names = shard_gptq_dir(tmp_path / "g", tmp_path / "s")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (sharded / names[1]).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        import_gptq(sharded, tmp_path / "q")
    assert str(e.value) == (f"{index_path} names 1 shard(s) missing from {sharded}: {names[1]}; the checkpoint is "
                            "incomplete (copy or download every shard)")
    assert not (tmp_path / "q").exists()  # nothing written
    (tmp_path / "elsewhere.safetensors").rename(sharded / names[1])
    key = "model.layers.1.mlp.down_proj.scales"
    wrong = names[(names.index(index["weight_map"][key]) + 1) % 3]
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: wrong}}))
    with pytest.raises(ValueError, match=f"{wrong} does not hold tensor '{key}' \\(the index .* says it should\\)"):
        import_gptq(sharded, tmp_path / "q")
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: "../x.safetensors"}}))
    with pytest.raises(ValueError, match=r"shard '../x.safetensors' is not a file name inside .*; paths are not"):
        import_gptq(sharded, tmp_path / "q")
    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"no 'weight_map' object"):
        import_gptq(sharded, tmp_path / "q")


def recast_gptq_dir(src, dst, scales_dtype, dense_dtype=None, scale_fn=None):
    """``src`` with its ``scales`` (after ``scale_fn``) cast to ``scales_dtype`` and its float non-quantized
    tensors to ``dense_dtype``, written with safetensors.torch (numpy has no bfloat16)."""
    from safetensors.torch import load_file, save_file

    copy_without_weights(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for k, v in tensors.items():
        if k.endswith(".scales"):
            tensors[k] = (scale_fn(v.float()) if scale_fn else v.float()).to(scales_dtype)
        elif dense_dtype is not None and v.is_floating_point():
            tensors[k] = v.to(dense_dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _linears(frozen):
    return {f"{i}.{n}": qt for i, layer in enumerate(frozen["layers"]) for n, qt in layer.items()
            if hasattr(qt, "scales")}


def test_bfloat16_scales_and_tensors_import_within_bfloat16_rounding(quantized, tmp_path):
    """The fp16 export recast to bf16 (scales and embeddings/norms/head) imports as the fp16 path does, but for
    the rounding of every scale to bf16: codes and zero points are equal, the scales are exactly the fp16 ones
    rounded to bf16, and so every dequantized weight ``(q - z) * s`` is within a relative 2^-8 (bf16's unit
    roundoff: 8 significant bits, round to nearest; ``q - z`` is an exact small integer and the float32 product
    of it with a 16-bit scale is exact, so the scale's rounding is the only difference)."""
    import torch

    from apiq_jax.models.safetensors_io import read_header

    qdir, frozen, lora = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    src = recast_gptq_dir(tmp_path / "g", tmp_path / "bf", torch.bfloat16, torch.bfloat16)
    header, _ = read_header(src / "model.safetensors")
    assert header["model.layers.0.self_attn.q_proj.scales"].dtype == "BF16"
    assert header["model.embed_tokens.weight"].dtype == "BF16" and header["model.norm.weight"].dtype == "BF16"
    res = import_gptq(src, tmp_path / "q")
    assert res["scale_dtype"] == "float16"  # every bf16 scale of this model is a float16 value: kept as float16
    f2, l2, _, meta = load_quantized(tmp_path / "q")
    assert meta["scale_dtype"] == "float16"
    assert_same_tree(l2, lora)

    def bf16(x):
        return torch.from_numpy(np.array(x, np.float32)).to(torch.bfloat16).float().numpy()

    changed = 0
    for name, qt in _linears(frozen).items():
        got = _linears(f2)[name]
        assert got.config == qt.config
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(qt.codes))
        np.testing.assert_array_equal(np.asarray(got.zeros), np.asarray(qt.zeros))
        np.testing.assert_array_equal(np.asarray(got.scales, np.float32), bf16(qt.scales))
        w16, wbf = np.asarray(dequantize(qt)), np.asarray(dequantize(got))
        assert np.all(np.abs(wbf - w16) <= 2.0**-8 * np.abs(w16)), name
        changed += int((wbf != w16).sum())
    assert changed > 0  # the bf16 file really rounded some scales
    for name in ("embed_tokens", "norm", "lm_head"):  # read as float32, the bf16 values exactly
        assert np.asarray(f2[name]).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(f2[name]), bf16(frozen[name]))


def test_float32_scales_holding_float16_values_import_bit_identically(quantized, tmp_path):
    import torch

    qdir, frozen, lora = quantized(3, "sym")
    export_model(qdir, tmp_path / "g", "gptq")
    res = import_gptq(recast_gptq_dir(tmp_path / "g", tmp_path / "f32", torch.float32, torch.float32),
                      tmp_path / "q")
    assert res["scale_dtype"] == "float16"
    f2, l2, _, _ = load_quantized(tmp_path / "q")
    assert_same_tree(f2, frozen)  # the float32 file held the float16 scales exactly: nothing changed
    assert_same_tree(l2, lora)


@pytest.mark.parametrize("dtype_name, scale_fn", [
    ("float32", lambda s: s * (1 + 2.0**-12)),  # a 12th significant bit: not a float16 value
    ("bfloat16", lambda s: s * 2.0**-20),  # ~1e-9: below float16's smallest subnormal
])
def test_scales_float16_cannot_hold_keep_their_dtype_exactly(quantized, tmp_path, dtype_name, scale_fn):
    import torch
    from safetensors.torch import load_file

    qdir, frozen, _ = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    src = recast_gptq_dir(tmp_path / "g", tmp_path / "s", getattr(torch, dtype_name), scale_fn=scale_fn)
    res = import_gptq(src, tmp_path / "q")
    assert res["scale_dtype"] == dtype_name
    stored = load_file(str(src / "model.safetensors"))
    f2, _, _, _ = load_quantized(tmp_path / "q")
    for name, qt in _linears(frozen).items():
        i, lin = name.split(".")
        attn = "self_attn" if lin in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        s_file = stored[f"model.layers.{i}.{attn}.{lin}.scales"].float().numpy().T  # [out, groups]
        got = _linears(f2)[name]
        assert got.config.scale_dtype == dtype_name and np.asarray(got.scales).dtype.name == dtype_name
        np.testing.assert_array_equal(np.asarray(got.scales, np.float32), s_file)  # kept exactly
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(qt.codes))
        g = qt.group_size
        q_minus_z = (np.asarray(qt.unpacked_codes())[:, :qt.shape[1]].astype(np.float32)
                     - np.repeat(np.asarray(qt.dense_zeros(), np.float32), g, axis=1))
        np.testing.assert_array_equal(np.asarray(dequantize(got)), q_minus_z * np.repeat(s_file, g, axis=1))
    with pytest.raises(ValueError, match=f"scales are {dtype_name}; GPTQ stores float16 scales"):
        export_model(tmp_path / "q", tmp_path / "back", "gptq")  # the documented limit of the GPTQ layout


def test_gptq_tensor_dtypes_and_values_are_checked(quantized, tmp_path):
    import torch

    qdir, _, _ = quantized(2, "asym")
    export_model(qdir, tmp_path / "g", "gptq")
    with pytest.raises(ValueError, match=r"GPTQ scales 'model.layers.0.self_attn.q_proj.scales' is stored as F64; "
                                         r"accepted: BF16, F16, F32"):
        import_gptq(recast_gptq_dir(tmp_path / "g", tmp_path / "f64", torch.float64), tmp_path / "q")

    def nan_in_first(s):
        s = s.clone()
        s.view(-1)[0] = float("nan")
        return s

    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.scales' holds NaN or inf values; "
                                         r"the checkpoint is damaged"):
        import_gptq(recast_gptq_dir(tmp_path / "g", tmp_path / "nan", torch.float16, scale_fn=nan_in_first),
                    tmp_path / "q")
    assert not (tmp_path / "q").exists()
