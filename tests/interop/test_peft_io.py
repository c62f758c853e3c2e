"""apiq_jax/interop/peft_io.py: peft key names and factor layout, round trip, and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from apiq_jax.interop.peft_io import load_adapter, peft_key, save_adapter
from tests.interop.helpers import random_lora


def test_keys_layout_and_round_trip(tiny, tmp_path):
    _, _, params = tiny
    lora = random_lora(params, rank=4)
    save_adapter(tmp_path, lora)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert sorted(cfg["target_modules"]) == sorted(lora.config.targets)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert peft_key(1, "q_proj", "A") == "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert peft_key(0, "down_proj", "B") == "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    a = tensors[peft_key(1, "down_proj", "A")]  # lora_A [r, in], lora_B [out, r]
    b = tensors[peft_key(1, "down_proj", "B")]
    assert a.shape == (4, 96) and b.shape == (64, 4)
    np.testing.assert_array_equal(a, np.asarray(lora.layers[1]["down_proj"].a).T)
    back = load_adapter(tmp_path, params)
    assert back.config == lora.config
    for x, y in zip(np.asarray(lora.layers[0]["q_proj"].b), np.asarray(back.layers[0]["q_proj"].b)):
        np.testing.assert_array_equal(x, y)


def test_missing_files_mismatch_and_options_are_named(tiny, tmp_path):
    _, _, params = tiny
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(tmp_path, params)
    save_adapter(tmp_path / "a", random_lora(params, rank=4))
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        load_adapter(tmp_path / "a", params)
    other = dict(params, layers=[dict(layer) for layer in params["layers"]])  # a base with a narrower MLP
    for layer in other["layers"]:
        layer["down_proj"] = np.zeros((64, 80), np.float32)
    save_adapter(tmp_path / "b", random_lora(params, rank=4))
    with pytest.raises(ValueError, match=r"layers.0.down_proj: got a \(96, 4\).*expected a \(80, 4\)"):
        load_adapter(tmp_path / "b", other)
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tmp_path / "b", params)
