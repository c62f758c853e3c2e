"""``--mesh`` on the commands: eval and finetune on 8 devices give the one-device results."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from apiq_jax.cli import main
from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.models import copy_tokenizer_files, save_pretrained
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params

VOCAB = 1024


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mesh_cli")
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64)
    save_pretrained(init_params(cfg, jax.random.PRNGKey(0)), d / "hf", cfg)
    copy_tokenizer_files(DEMO_MODEL_DIR, d / "hf")
    ids = np.random.default_rng(0).integers(0, VOCAB, (16, 32)).astype(np.int32)
    np.save(d / "ids.npy", ids)
    assert main(["quantize", "--model", str(d / "hf"), "--method", "rtn", "--bits", "2", "--group-size", "32",
                 "--rank", "4", "--calib", str(d / "ids.npy"), "--out", str(d / "q"), "--quiet"]) == 0
    return d / "q", d / "ids.npy"


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_mesh_equals_one_device(quantized, capsys):
    qdir, ids = quantized
    assert main(["eval", "--model", str(qdir), "--data", str(ids), "--quiet", "--mesh", "data=1,fsdp=1"]) == 2
    assert "needs 1 devices, but 8 are available" in capsys.readouterr().err
    assert main(["eval", "--model", str(qdir), "--data", str(ids), "--quiet", "--batch-size", "8",
                 "--mesh", "data=4,fsdp=2"]) == 0
    sharded = _last_json(capsys)["mean_nll"]
    # the reference: the same model on one device (the library call the command makes, without a mesh)
    from apiq_jax.evaluate import perplexity_ids
    from apiq_jax.models import load_quantized
    frozen, lora, config, _ = load_quantized(qdir)
    ref = perplexity_ids(frozen, np.load(ids), config=config, lora=lora, batch_size=8).mean_nll
    assert abs(sharded - ref) <= 1e-6 * ref


def test_finetune_mesh_equals_one_device(quantized, tmp_path, capsys):
    qdir, ids = quantized
    common = ["finetune", "--model", str(qdir), "--data", str(ids), "--steps", "3", "--batch-size", "8",
              "--lr", "1e-3", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one"), "--mesh", "data=1,fsdp=1"]) == 2   # 8 devices here
    capsys.readouterr()
    from apiq_jax.models import load_quantized
    from apiq_jax.training import FinetuneConfig, finetune
    frozen, lora, config, _ = load_quantized(qdir)
    ref, ref_losses = finetune(frozen, lora, np.load(ids), config,
                               FinetuneConfig(steps=3, batch_size=8, learning_rate=1e-3), progress=False)
    assert main([*common, "--out", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=4"]) == 0
    summary = _last_json(capsys)
    np.testing.assert_allclose(summary["final_loss"], ref_losses[-1], rtol=1e-5)
    saved = load_file(str(next((tmp_path / "mesh").glob("lora*.safetensors"))))
    b = saved[next(k for k in saved if "layers.0" in k and "q_proj" in k and k.endswith("b"))]
    want = np.asarray(ref["layers"][0]["q_proj"].b)
    assert np.linalg.norm(b.reshape(want.shape) - want) <= 1e-5 * np.linalg.norm(want)


def test_quantize_mesh_equals_one_device(quantized, tmp_path, capsys):
    """`quantize --method apiq-bw --mesh data=8`: the samples split over 8 devices (batch 1: the training step
    replicated) give the report and LoRA of the one-device library run."""
    qdir, ids = quantized
    hf = qdir.parent / "hf"
    assert main(["quantize", "--model", str(hf), "--method", "apiq-bw", "--bits", "2", "--group-size", "32",
                 "--rank", "4", "--epochs", "1", "--calib", str(ids), "--out", str(tmp_path / "q8"), "--quiet",
                 "--mesh", "data=8"]) == 0
    capsys.readouterr()
    from apiq_jax.calibration import ApiQOptions, apiq_bw
    from apiq_jax.lora import LoraConfig
    from apiq_jax.models import load_quantized
    from apiq_jax.models.hf_io import load_config, load_params
    from apiq_jax.quant import QuantConfig
    config = load_config(hf)
    params = load_params(hf, config)
    ref = apiq_bw(params, config, np.load(ids), QuantConfig(bits=2, group_size=32), LoraConfig(rank=4, alpha=16.0),
                  key=jax.random.PRNGKey(0), options=ApiQOptions(epochs=1))
    _, lora, _, meta = load_quantized(tmp_path / "q8")
    got = [b["error_after"] for b in meta["report"]["blocks"]]
    np.testing.assert_allclose(got, [b.error_after for b in ref.report.blocks], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(ref.lora), strict=True):
        b = np.asarray(b)
        assert np.linalg.norm(np.asarray(a) - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30)


def test_generate_mesh_equals_one_device(quantized, capsys):
    qdir, _ = quantized
    prompts = ["Once upon a time", "def f(x):", "The"]   # 3 rows: padded to the 8-way data axis
    args = ["generate", "--model", str(qdir), "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "4"]
    for p in prompts:
        args += ["--prompt", p]
    assert main([*args, "--mesh", "data=8"]) == 0
    sharded = _last_json(capsys)
    assert sharded["devices"] == 8
    # the reference: the library call the command makes, on one device
    from apiq_jax.data import load_tokenizer
    from apiq_jax.generation import generate
    from apiq_jax.models import load_quantized
    frozen, lora, config, _ = load_quantized(qdir)
    tok = load_tokenizer(qdir)
    ref = generate(frozen, lora, [list(tok(p)["input_ids"]) for p in prompts], config, max_new_tokens=8,
                   temperature=0.7, seed=4, eos_token_id=sorted({tok.eos_token_id} - {None}) or None,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    assert sharded["completions"] == [tok.decode([int(t) for t in row], skip_special_tokens=True)
                                      for row in ref.tokens]
