"""Two processes on localhost (jax.distributed, CPU collectives) finetune like one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params, quantize_model
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
#: save_every 2 of 3 steps: the run writes an orbax checkpoint from both processes mid-way and at the end
FINETUNE = FinetuneConfig(steps=3, batch_size=8, learning_rate=1e-3, save_every=2)


def model():
    """The model, LoRA (both factors nonzero) and data both processes and the reference use."""
    frozen, lora = quantize_model(init_params(CFG, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
                                  LoraConfig(rank=4), key=jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape), lora)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (16, 32), 0, CFG.vocab_size))
    return frozen, lora, ids, CFG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(*args: str) -> list[str]:
    """Run distributed_worker.py as processes 0 and 1 with ``args``; their logs (both must exit 0)."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("distributed_worker.py")), str(i),
                               str(port), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


def test_two_processes_equal_one(tmp_path):
    _run_two(str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
    got = np.load(tmp_path / "result.npz")
    frozen, lora, ids, cfg = model()
    ref, ref_losses = finetune(frozen, lora, ids, cfg, FINETUNE, progress=False)
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)
    for i, want in enumerate(jax.tree.leaves(ref)):
        want = np.asarray(want)
        assert np.linalg.norm(got[f"leaf{i}"] - want) <= 1e-5 * np.linalg.norm(want), i


def test_finetune_command_in_two_processes(tmp_path):
    """`apiq-jax finetune --coordinator ... --num-processes 2 --process-id I --mesh data=4,fsdp=2`: process 0
    alone writes --out, and its LoRA is the one-process library result."""
    from apiq_jax.models import load_quantized, save_quantized

    frozen, lora, ids, cfg = model()
    save_quantized(tmp_path / "q", frozen, lora, cfg)
    np.save(tmp_path / "ids.npy", ids)
    logs = _run_two("cli", "finetune", "--model", str(tmp_path / "q"), "--data", str(tmp_path / "ids.npy"),
                    "--out", str(tmp_path / "ft"), "--steps", "3", "--batch-size", "8", "--lr", "1e-3",
                    "--save-every", "2", "--quiet", "--mesh", "data=4,fsdp=2")
    assert sum('"final_loss"' in log for log in logs) == 2
    ref, _ = finetune(*load_quantized(tmp_path / "q")[:2], ids, cfg, FINETUNE, progress=False)
    _, saved, _, _ = load_quantized(tmp_path / "ft")
    for got, want in zip(jax.tree.leaves(saved), jax.tree.leaves(ref), strict=True):
        want = np.asarray(want)
        assert np.linalg.norm(np.asarray(got) - want) <= 1e-5 * np.linalg.norm(want)


def test_quantize_command_in_two_processes(tmp_path):
    """`apiq-jax quantize --method apiq-bw --mesh data=1,fsdp=8` over two processes (the samples and the
    calibrated block's weights split across both): process 0 alone writes --out, and its LoRA, clip-driven
    codes and errors are the one-process library run's."""
    from apiq_jax.calibration import ApiQOptions, apiq_bw
    from apiq_jax.demo_data import DEMO_MODEL_DIR
    from apiq_jax.models import copy_tokenizer_files, load_quantized, save_pretrained
    from apiq_jax.models.hf_io import load_params

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1024, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64)
    save_pretrained(init_params(cfg, jax.random.key(0)), tmp_path / "hf", cfg)
    copy_tokenizer_files(DEMO_MODEL_DIR, tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 32)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    logs = _run_two("cli", "quantize", "--model", str(tmp_path / "hf"), "--method", "apiq-bw", "--bits", "2",
                    "--group-size", "32", "--rank", "4", "--epochs", "1", "--calib", str(tmp_path / "ids.npy"),
                    "--out", str(tmp_path / "q"), "--quiet", "--mesh", "data=1,fsdp=8")
    assert sum('"activation_errors"' in log for log in logs) == 2
    assert not (tmp_path / "q" / "calibration_work").exists()
    ref = apiq_bw(load_params(tmp_path / "hf", cfg), cfg, ids, QuantConfig(bits=2, group_size=32),
                  LoraConfig(rank=4, alpha=16.0), key=jax.random.PRNGKey(0), options=ApiQOptions(epochs=1))
    frozen, lora, _, meta = load_quantized(tmp_path / "q")
    np.testing.assert_allclose([b["error_after"] for b in meta["report"]["blocks"]],
                               [b.error_after for b in ref.report.blocks], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(lora), jax.tree.leaves(ref.lora), strict=True):
        want = np.asarray(want)
        assert np.linalg.norm(np.asarray(got) - want) <= 1e-5 * max(np.linalg.norm(want), 1e-30)
    for g, r in zip(frozen["layers"], ref.params["layers"], strict=True):  # the same frozen words
        for name in ("q_proj", "down_proj"):
            np.testing.assert_array_equal(np.asarray(g[name].codes), np.asarray(r[name].codes))
