"""``apiq-jax finetune`` (apiq_jax/commands/finetune.py): quantize -> finetune -> eval on a tiny
model; resume; defaults from FinetuneConfig; backends; errors."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
import pytest

from apiq_jax.commands import finetune as ft_cmd
from apiq_jax.models import load_quantized
from apiq_jax.training import FinetuneConfig
from tests.commands.conftest import last_json, run_cli


def test_finetune_trains_lora_only_and_resumes(qlora_quantized, data, tmp_path, capsys):
    quantized = qlora_quantized
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(quantized), "--data", str(data["calib"]), "--eval", str(data["calib"]),
            "--out", str(out), "--steps", "12", "--batch-size", "3", "--lr", "1e-2", "--save-every", "4",
            "--quiet"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    res = last_json(stdout)
    # three fixed windows, 12 steps: the LoRA must fit them better than the QLoRA init (b = 0)
    assert res["final_loss"] < res["first_loss"]
    assert res["perplexity_after"] < res["perplexity_before"]
    assert (out / "loss.png").is_file()

    frozen0, lora0, *_ = load_quantized(quantized)
    frozen1, lora1, _, meta = load_quantized(out)
    for a, b in zip(np.asarray(frozen0["layers"][0]["q_proj"].codes), np.asarray(frozen1["layers"][0]["q_proj"].codes)):
        np.testing.assert_array_equal(a, b)  # the quantized weights are untouched
    assert float(np.abs(np.asarray(lora1["layers"][0]["q_proj"]["b"])).max()) > 0  # b left zero init
    assert len(meta["finetune"]["losses"]) == 12

    # eval reads the finetuned directory and agrees with the reported perplexity
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "--data", str(data["calib"]))
    assert code == 0
    assert abs(last_json(stdout)["perplexity"] / res["perplexity_after"] - 1) < 1e-5

    # re-running the finished command resumes from the last checkpoint: same LoRA, no new steps
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0
    again = last_json(stdout)
    assert again["final_loss"] == res["final_loss"]
    _, lora2, *_ = load_quantized(out)
    np.testing.assert_array_equal(np.asarray(lora2["layers"][1]["down_proj"]["a"]),
                                  np.asarray(lora1["layers"][1]["down_proj"]["a"]))


@pytest.mark.parametrize("change,message", [
    ({"--model": "HF"}, "not a saved quantized model"),
    ({"--steps": "0"}, "steps=0"),
    ({"--data": "bad"}, "accepted: 0 <= id < 1024"),
    ({"--data": "floats"}, "must be integers"),
    ({"--eval": "missing.npy"}, "file not found"),
    ({"--out": "MODEL"}, "is the --model directory; give a new directory"),
])
def test_finetune_errors(qlora_quantized, tiny_dir, data, tmp_path, capsys, change, message):
    args = {"--model": str(qlora_quantized), "--data": str(data["calib"]), "--out": str(tmp_path / "o"),
            "--steps": "2"}
    for k, v in change.items():
        if v == "HF":
            v = str(tiny_dir)
        elif v == "MODEL":
            v = str(qlora_quantized)
        elif v in data:
            v = str(data[v])
        elif v.endswith(".npy"):
            v = str(tmp_path / v)
        args[k] = v
    argv = ["finetune", *[x for kv in args.items() for x in kv], "--quiet"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.startswith("apiq-jax finetune: error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_defaults_come_from_finetune_config():
    """The CLI's training defaults are FinetuneConfig's field defaults (one source)."""
    p = argparse.ArgumentParser()
    ft_cmd.add_arguments(p)
    args = p.parse_args(["--model", "m", "--data", "d.npy", "--out", "o"])
    fields = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    assert args.steps == fields["steps"] == FinetuneConfig().steps
    assert args.batch_size == fields["batch_size"]
    assert args.lr == fields["learning_rate"]
    assert args.warmup == fields["warmup_steps"]
    assert args.weight_decay == fields["weight_decay"]
    assert args.save_every == fields["save_every"]
    assert args.seed == fields["seed"]
    assert f"optimizer steps (default {fields['steps']})" in p.format_help()


def test_finetune_with_the_interpret_backend(rtn_quantized, data, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "finetune", "--model", str(rtn_quantized), "--data", str(data["calib"]),
                                "--out", str(tmp_path / "f"), "--steps", "2", "--batch-size", "3",
                                "--backend", "interpret", "--quiet")
    assert code == 0, err
    assert last_json(stdout)["backend"] == "interpret"


def test_save_loss_plot(tmp_path):
    path = ft_cmd.save_loss_plot([3.0, 2.5, 2.0], tmp_path / "sub" / "loss.png")
    assert path == tmp_path / "sub" / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_finetune_16bit_remat_and_accumulation_end_to_end(qlora_quantized, data, tmp_path, capsys):
    out = tmp_path / "ft16"
    code, stdout, err = run_cli(capsys, "finetune", "--model", str(qlora_quantized), "--data", str(data["calib"]),
                                "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                                "--dtype", "bfloat16", "--remat", "block", "--grad-accum", "2", "--quiet")
    assert code == 0, err
    res = last_json(stdout)
    assert (res["dtype"], res["remat"], res["grad_accum"]) == ("bfloat16", "block", 2)
    assert np.isfinite(res["first_loss"]) and np.isfinite(res["final_loss"])
    frozen0, _, config, _ = load_quantized(qlora_quantized)
    frozen1, lora1, _, _ = load_quantized(out)
    assert frozen1["embed_tokens"].dtype == frozen0["embed_tokens"].dtype  # the saved model keeps its dtype
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(lora1))  # float32 master weights


@pytest.mark.parametrize("flag,value,message", [
    ("--dtype", "float64", "dtype='float64' is not supported; accepted: ('float32', 'bfloat16', 'float16')"),
    ("--remat", "full", "remat='full' is not supported; accepted: ('none', 'block', 'dots', 'sqrt')"),
    ("--grad-accum", "2", "grad_accum=2 must divide batch_size=3"),
    ("--grad-accum", "0", "grad_accum=0 must be a positive int"),
])
def test_finetune_bad_memory_flags(qlora_quantized, data, tmp_path, capsys, flag, value, message):
    code, _, err = run_cli(capsys, "finetune", "--model", str(qlora_quantized), "--data", str(data["calib"]),
                           "--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "3", flag, value, "--quiet")
    assert code == 2
    assert err.startswith(f"apiq-jax finetune: error: {message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_text_data_is_tokenized_once_into_a_cache_beside_the_output(qlora_quantized, data, tmp_path, capsys,
                                                                     monkeypatch):
    from apiq_jax import data as D

    out = tmp_path / "fttext"
    argv = ["finetune", "--model", str(qlora_quantized), "--data", str(data["text"]), "--out", str(out),
            "--seqlen", "16", "--steps", "2", "--batch-size", "2", "--quiet"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    cached = list((out / ft_cmd.DATA_CACHE_SUBDIR).glob("text.*.npy"))
    assert len(cached) == 1
    expected = D.windows(data["text"], seqlen=16, tokenizer=qlora_quantized)
    ids = np.load(cached[0], mmap_mode="r")
    np.testing.assert_array_equal(ids[: expected.size].reshape(expected.shape), expected)
    assert last_json(stdout)["train_windows"] == expected.shape[0]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached ids should have been re-used")

    monkeypatch.setattr(D, "tokenize", no_tokenizing)
    code, stdout, err = run_cli(capsys, *argv)  # the re-run (it resumes) reads the cached ids
    assert code == 0, err
    assert last_json(stdout)["train_windows"] == expected.shape[0]


def test_help_states_the_compute_dtype_and_the_default_reason():
    p = argparse.ArgumentParser()
    ft_cmd.add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "compute dtype" in text and "{float32,bfloat16,float16}" in text
    assert "{none,block,dots,sqrt}" in text and "fastest step on small models is kept" in text
    args = p.parse_args(["--model", "m", "--data", "d.npy", "--out", "o"])
    assert (args.dtype, args.remat, args.grad_accum) == ("float32", "none", 1)
