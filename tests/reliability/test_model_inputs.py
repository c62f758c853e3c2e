"""Bad model directories: one clear line, exit status 2, nothing written (``--out`` never created)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.reliability.conftest import assert_user_error, finetune_args, quantize_args, run_cli, snapshot

WEIGHTS = "model.safetensors"


def _edit_config(model, **changes):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(model, fn):
    tensors = load_file(str(model / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(model / WEIGHTS))


def _quantize_fails(capsys, model, out, calib, fragment):
    before = snapshot(model)
    code, _, err = run_cli(capsys, *quantize_args(model, out, calib))
    assert_user_error(code, err, fragment, "quantize")
    assert not out.exists()  # nothing written
    assert snapshot(model) == before  # the model is untouched


def test_model_directory_missing(capsys, tmp_path, files):
    _quantize_fails(capsys, tmp_path / "nope", tmp_path / "out", files["calib"], "directory not found")


def test_config_missing(capsys, hf_copy, tmp_path, files):
    (hf_copy / "config.json").unlink()
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "config.json not found")


def test_config_invalid_json(capsys, hf_copy, tmp_path, files):
    (hf_copy / "config.json").write_text('{"model_type": "llama", ')
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "config.json")


def test_unsupported_architecture_gpt2(capsys, hf_copy, tmp_path, files):
    (hf_copy / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 1024, "n_embd": 64,
        "n_layer": 2, "n_head": 4, "n_positions": 64}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "['GPT2LMHeadModel']")


def test_inconsistent_sizes(capsys, hf_copy, tmp_path, files):
    _edit_config(hf_copy, num_key_value_heads=3)  # 4 heads cannot share 3 kv heads
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "num_key_value_heads=3")


def test_tensor_missing(capsys, hf_copy, tmp_path, files):
    _edit_tensors(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "model.layers.1.mlp.up_proj.weight")


def test_tensor_extra(capsys, hf_copy, tmp_path, files):
    _edit_tensors(hf_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "unexpected tensors")


def test_tensor_wrong_shape(capsys, hf_copy, tmp_path, files):
    _edit_tensors(hf_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "has shape (64, 32), expected (64, 64)")


def test_tensor_wrong_dtype(capsys, hf_copy, tmp_path, files):
    _edit_tensors(hf_copy, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "'model.norm.weight' is stored as I32")


def test_truncated_safetensors(capsys, hf_copy, tmp_path, files):
    data = (hf_copy / WEIGHTS).read_bytes()
    (hf_copy / WEIGHTS).write_bytes(data[: len(data) // 2])  # an interrupted download
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], f"cannot read {hf_copy / WEIGHTS}")


def test_corrupt_safetensors_header(capsys, hf_copy, tmp_path, files):
    data = bytearray((hf_copy / WEIGHTS).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"{" + b"x" * (n - 1)  # same length, not JSON
    (hf_copy / WEIGHTS).write_bytes(bytes(data))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "as safetensors")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_the_tensor(capsys, hf_copy, tmp_path, files, bad):
    def poison(t):
        w = t["model.layers.1.self_attn.v_proj.weight"].copy()
        w[3, 5] = bad
        t["model.layers.1.self_attn.v_proj.weight"] = w

    _edit_tensors(hf_copy, poison)
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"],
                    "'model.layers.1.self_attn.v_proj.weight' holds 1 NaN or inf values")


def test_quantized_directory_given_to_quantize(capsys, tiny_q, tmp_path, files):
    _quantize_fails(capsys, tiny_q, tmp_path / "out", files["calib"], "is already a quantized model")


def test_hf_directory_given_to_finetune(capsys, tiny_hf, tmp_path, files):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *finetune_args(tiny_hf, out, files["calib"]))
    assert_user_error(code, err, "is not a saved quantized model", "finetune")
    assert not out.exists()


def test_tokenizer_larger_than_the_vocabulary(capsys, hf_copy, tmp_path, files):
    _edit_config(hf_copy, vocab_size=512)  # the demo tokenizer has 1024 tokens
    _edit_tensors(hf_copy, lambda t: t.update({k: t[k][:512].copy() for k in ("model.embed_tokens.weight",
                                                                              "lm_head.weight")}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["text"], "has 1024 tokens, more than the model's vocab_size 512")


def test_shard_path_outside_the_model_directory_is_not_followed(capsys, hf_copy, tmp_path, files):
    """A safetensors index naming ``../x`` is refused, even when that file exists."""
    (hf_copy / WEIGHTS).rename(tmp_path / "outside.safetensors")
    keys = load_file(str(tmp_path / "outside.safetensors")).keys()
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../outside.safetensors" for k in keys}}))
    _quantize_fails(capsys, hf_copy, tmp_path / "out", files["calib"], "is not a file name inside")


def test_gptq_index_naming_a_missing_shard_is_refused_by_import(capsys, tiny_q, tmp_path):
    """A sharded GPTQ checkpoint copied without one of its shards (an interrupted download)."""
    from tests.interop.helpers import shard_gptq_dir

    assert run_cli(capsys, "export", "--model", tiny_q, "--format", "gptq", "--out", tmp_path / "g")[0] == 0
    src, names = shard_gptq_dir(tmp_path / "g", tmp_path / "s")
    (src / names[2]).unlink()
    before = snapshot(src)
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "import", "--from", "gptq", src, "--out", out)
    assert_user_error(code, err, f"names 1 shard(s) missing from {src}: {names[2]}; the checkpoint is incomplete",
                      "import")
    assert not out.exists() and snapshot(src) == before
