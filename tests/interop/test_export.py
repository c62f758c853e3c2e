"""apiq_jax/interop/export.py: the peft export read by real peft, the merged export by transformers,
the GPTQ export by a real GPTQ runtime when installed (gptqmodel's torch kernel), else the layout
tests of test_gptq_format.py; and the directory checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apiq_jax.interop.export import export_model
from apiq_jax.models import apply
from apiq_jax.models.llama import forward
from apiq_jax.quant import QuantizedTensor, dequantize
from tests.conftest import require_module
from tests.models.hf_helpers import random_ids, torch_logits


@pytest.fixture(scope="module")
def ids(tiny):
    return random_ids(tiny[1].vocab_size, (2, 24), seed=3)


def test_peft_export_loads_in_peft_with_equal_logits(quantized, ids, tmp_path):
    torch, transformers = require_module("torch"), require_module("transformers")
    peft = require_module("peft")
    qdir, frozen, lora = quantized(2, "asym")
    res = export_model(qdir, tmp_path / "out", "peft")
    assert res["adapter"] == str(tmp_path / "out" / "apiq_init") and res["quantized_linears"] == 14
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "apiq_init")).eval()
    ref = np.asarray(apply(frozen, lora, ids, _config(qdir)))
    np.testing.assert_allclose(torch_logits(model, ids), ref, atol=1e-4, rtol=0)  # float32 both sides
    with model.disable_adapter():  # the base alone is the dequantized model
        np.testing.assert_allclose(torch_logits(model, ids), np.asarray(apply(frozen, None, ids, _config(qdir))),
                                   atol=1e-4, rtol=0)


def _config(qdir):
    from apiq_jax.models.hf_io import load_config

    return load_config(qdir)


def test_merged_export_is_one_dense_checkpoint(quantized, ids, tmp_path):
    torch, transformers = require_module("torch"), require_module("transformers")
    qdir, frozen, lora = quantized(3, "sym")
    export_model(qdir, tmp_path / "m", "merged")
    assert not (tmp_path / "m" / "apiq_init").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(model, ids), np.asarray(apply(frozen, lora, ids, _config(qdir))),
                               atol=1e-4, rtol=0)


def test_peft_export_dtype(quantized, tmp_path):
    from safetensors.numpy import load_file

    qdir, frozen, _ = quantized(2, "asym")
    export_model(qdir, tmp_path / "h", "peft", dtype="float16")
    t = load_file(str(tmp_path / "h" / "model.safetensors"))
    w = t["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == np.float16
    np.testing.assert_array_equal(w, np.asarray(dequantize(frozen["layers"][0]["q_proj"])).astype(np.float16))
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "float16"


def test_gptq_export_config_and_tensors(quantized, tmp_path):
    from safetensors.numpy import load_file

    from tests.interop.test_gptq_format import reference_dequantize

    qdir, frozen, _ = quantized(3, "sym")
    export_model(qdir, tmp_path / "g", "gptq")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 3 and qc["group_size"] == 32
    assert qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    assert qc["sym"] is False  # ApiQ's symmetric zero 2^(b-1)-1 is stored explicitly, never assumed
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert (tmp_path / "g" / "apiq_init" / "adapter_model.safetensors").is_file()
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        base = f"model.layers.1.{name}"
        w = reference_dequantize({k: t[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 3, True)
        qt = frozen["layers"][1][name.split(".")[1]]
        assert isinstance(qt, QuantizedTensor)
        np.testing.assert_array_equal(w, np.asarray(dequantize(qt), np.float64))
    assert "model.layers.0.self_attn.q_proj.weight" not in t and "model.embed_tokens.weight" in t


@pytest.mark.parametrize("bits, scheme", [(2, "asym"), (3, "sym")])
def test_gptq_export_runs_in_gptqmodel(quantized, ids, tmp_path, bits, scheme):
    """transformers + gptqmodel (torch kernel, CPU) + peft. gptqmodel is not in the test extra (it pins an
    older numpy than the project; see docs/interop.md), so this runs where it is installed, else skips."""
    pytest.importorskip("gptqmodel", reason="gptqmodel not installed (optional GPTQ runtime check)")
    torch, transformers = require_module("torch"), require_module("transformers")
    peft = require_module("peft")
    qdir, frozen, lora = quantized(bits, scheme)
    export_model(qdir, tmp_path / "g", "gptq")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), dtype=torch.float32,
                                                             device_map="cpu")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "g" / "apiq_init")).eval()
    got = torch_logits(model, ids)
    cfg = _config(qdir)
    # the torch kernel dequantizes to float16 (scale dtype) before a float32 matmul: against apiq-jax with the
    # same float16 rounding of the dequantized weights the logits agree to float32 precision
    fp16 = {**frozen, "layers": [{k: (np.asarray(dequantize(v)).astype(np.float16).astype(np.float32)
                                      if isinstance(v, QuantizedTensor) else v) for k, v in layer.items()}
                                 for layer in frozen["layers"]]}
    np.testing.assert_allclose(got, np.asarray(forward(fp16, lora, ids, cfg)), atol=1e-4, rtol=0)
    # and against apiq-jax's exact weights within that rounding (2-bit products are exact in float16)
    np.testing.assert_allclose(got, np.asarray(apply(frozen, lora, ids, cfg)), atol=1e-4 if bits == 2 else 1e-2,
                               rtol=0)


def test_out_and_format_checks(quantized, tmp_path):
    qdir, _, _ = quantized(2, "asym")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_model(qdir, tmp_path / "full", "peft")
    with pytest.raises(ValueError, match="--format 'onnx' is not supported; accepted: \\('peft', 'merged', 'gptq'\\)"):
        export_model(qdir, tmp_path / "o", "onnx")
    with pytest.raises(FileNotFoundError, match="not a saved apiq-jax quantized model"):
        export_model(tmp_path / "full", tmp_path / "o", "peft")
