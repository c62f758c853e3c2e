"""``apiq-jax export`` (apiq_jax/commands/export.py): the three formats from the CLI, the JSON line,
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apiq_jax.models import apply, load_pretrained, load_quantized
from tests.commands.conftest import last_json, run_cli


@pytest.mark.parametrize("fmt", ["peft", "merged", "gptq"])
def test_export_formats(capsys, rtn_quantized, tmp_path, fmt):
    out = tmp_path / fmt
    code, stdout, err = run_cli(capsys, "export", "--model", str(rtn_quantized), "--format", fmt, "--out", str(out))
    assert code == 0, err
    res = last_json(stdout)
    assert res["format"] == fmt and res["quantized_linears"] == 14
    assert (out / "tokenizer.json").is_file()  # the tokenizer travels with the model
    assert (out / "apiq_init" / "adapter_config.json").is_file() == (fmt != "merged")
    if fmt == "merged":  # the merged dense model in apiq-jax equals the quantized model with its LoRA
        frozen, lora, cfg, _ = load_quantized(rtn_quantized)
        ids = np.arange(20, dtype=np.int32).reshape(2, 10)
        np.testing.assert_allclose(np.asarray(load_pretrained(out)(ids)), np.asarray(apply(frozen, lora, ids, cfg)),
                                   atol=1e-4, rtol=0)
    if fmt == "gptq":
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["bits"] == 2 and qc["checkpoint_format"] == "gptq"


def test_export_errors_are_one_line(capsys, rtn_quantized, tiny_dir, tmp_path):
    code, _, err = run_cli(capsys, "export", "--model", str(tiny_dir), "--format", "peft", "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("apiq-jax export: error: ") and "not a saved apiq-jax quantized model" in err
    code, _, err = run_cli(capsys, "export", "--model", str(rtn_quantized), "--format", "peft", "--out",
                           str(rtn_quantized))
    assert code == 2 and "is the model directory itself" in err and len(err.strip().splitlines()) == 1
