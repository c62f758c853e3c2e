"""``apiq-jax quantize``: quantize -> eval round trip on a tiny model, and error cases."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from apiq_jax.cli import main
from apiq_jax.demo_data import DEMO_MODEL_DIR
from apiq_jax.models import copy_tokenizer_files, load_quantized, save_pretrained
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import LINEARS, init_params
from apiq_jax.quant import QuantizedTensor

VOCAB = 1024  # the bundled demo tokenizer's vocabulary, reused for the .txt path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_hf")
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128,
    )
    save_pretrained(init_params(cfg, jax.random.PRNGKey(0)), d, cfg)
    copy_tokenizer_files(DEMO_MODEL_DIR, d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.integers(0, VOCAB, (3, 32)).astype(np.int32))
    np.save(d / "eval.npy", rng.integers(0, VOCAB, (4, 32)).astype(np.int32))
    np.save(d / "stream.npy", rng.integers(0, VOCAB, 500).astype(np.int64))
    np.save(d / "bad.npy", np.full((2, 16), VOCAB + 5, np.int32))
    np.save(d / "floats.npy", np.zeros((2, 16), np.float32))
    (d / "text.txt").write_text("def f(x):\n    return x + 1\n\n" * 40)
    return {p.stem: p for p in d.iterdir()}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _quantize_args(model: Path, out: Path, calib: Path, method: str, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--method", method, "--bits", "2", "--group-size", "32",
            "--rank", "4", "--alpha", "8", "--calib", str(calib), "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("method,calib,extra", [
    ("rtn", "calib", ()),
    ("apiq-bw", "text", ("--epochs", "1", "--nsamples", "2", "--seqlen", "24")),
    ("apiq-lw", "stream", ("--epochs", "1", "--nsamples", "2", "--seqlen", "16")),
    ("loftq", "calib", ("--num-iter", "2")),
    ("qlora", "calib", ("--bits", "3")),
    ("gptq", "calib", ("--bits", "4", "--scheme", "sym")),
])
def test_quantize_eval_round_trip(tiny_dir, data, tmp_path, capsys, method, calib, extra):
    calib_path = data[calib]
    out = tmp_path / method
    code, stdout, err = _run(_quantize_args(tiny_dir, out, calib_path, method, *extra), capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    bits = int(extra[extra.index("--bits") + 1]) if "--bits" in extra else 2
    assert summary["method"] == method and summary["bits"] == bits
    assert summary["seconds"] >= 0 and summary["bits_per_param"] > bits
    assert len(summary["activation_errors"]) == 2
    frozen, lora, cfg, lcfg, meta = load_quantized(out)
    assert meta["method"] == method and lcfg.rank == 4 and cfg.vocab_size == VOCAB
    assert all(isinstance(frozen["layers"][0][n], QuantizedTensor) for n in LINEARS)
    assert frozen["layers"][0]["q_proj"].bits == bits
    assert (out / "report.json").is_file() and (out / "tokenizer.json").is_file()
    code, stdout, err = _run(["eval", "--model", str(out), "--data", str(data["eval"])], capsys)
    assert code == 0, err
    ev = json.loads(stdout.strip().splitlines()[-1])
    assert ev["quantized"] is True and np.isfinite(ev["perplexity"]) and ev["perplexity"] > 1


@pytest.mark.parametrize("change,message", [
    ({"--method": "awq"}, "--method 'awq' is not supported"),
    ({"--bits": "5"}, "--bits 5 is not supported by --method rtn"),
    ({"--calib": "missing.npy"}, "file not found"),
    ({"--calib": "bad"}, "out of range"),
    ({"--calib": "floats"}, "must be integers"),
    ({"--model": "no_such_dir"}, "directory not found"),
    ({"--rank": "0"}, "--rank 0 must be a positive integer"),
])
def test_quantize_errors(tiny_dir, data, tmp_path, capsys, change, message):
    args = _quantize_args(tiny_dir, tmp_path / "o", data["calib"], "rtn")
    for flag, value in change.items():
        i = args.index(flag)
        if flag == "--calib":
            value = str(data[value]) if value in data else str(tmp_path / value)
        elif flag == "--model":
            value = str(tmp_path / value)
        args[i + 1] = value
    code, _, err = _run(args, capsys)
    assert code != 0
    assert message in err


def test_quantize_option_mismatch(tiny_dir, data, tmp_path, capsys):
    code, _, err = _run(_quantize_args(tiny_dir, tmp_path / "o", data["calib"], "rtn", "--epochs", "2"), capsys)
    assert code != 0 and "--epochs applies to apiq-bw/apiq-lw only" in err
    code, _, err = _run(_quantize_args(tiny_dir, tmp_path / "o", data["calib"], "apiq-bw", "--scheme", "nf"), capsys)
    assert code != 0 and "--scheme nf is not supported by --method apiq-bw" in err
    code, _, err = _run(_quantize_args(tiny_dir, tmp_path / "o", data["stream"], "rtn", "--seqlen", "600"), capsys)
    assert code != 0 and "fewer than one window" in err


def test_interrupted_quantize_resumes_on_rerun(tiny_dir, data, tmp_path, capsys, monkeypatch):
    """An ApiQ run stopped after block 0 continues there when the same command is re-run."""
    from apiq_jax.commands import quantize as qcmd

    extra = ("--epochs", "1", "--nsamples", "2", "--seqlen", "16")
    full = tmp_path / "full"
    assert _run(_quantize_args(tiny_dir, full, data["stream"], "apiq-bw", *extra), capsys)[0] == 0

    class Stop(Exception):
        pass

    def stop_after_block_0(i, report):
        if i == 0:
            raise Stop

    original = qcmd.method_options

    def interrupting(*args, **kwargs):
        return {**original(*args, **kwargs), "on_block_end": stop_after_block_0}

    out = tmp_path / "resumed"
    argv = _quantize_args(tiny_dir, out, data["stream"], "apiq-bw", *extra)
    monkeypatch.setattr(qcmd, "method_options", interrupting)
    with pytest.raises(Stop):
        main(argv)
    assert (out / qcmd.WORK_SUBDIR / "streams" / "0").is_dir()  # block 0 was checkpointed
    monkeypatch.setattr(qcmd, "method_options", original)
    assert _run(argv, capsys)[0] == 0
    assert not (out / qcmd.WORK_SUBDIR).exists()  # removed once the model is saved

    *_, meta = load_quantized(out)
    assert meta["report"]["extra"]["resumed_from_block"] == 1
    _, lora_full, *_ = load_quantized(full)
    _, lora_res, *_ = load_quantized(out)
    for a, b in zip(jax.tree.leaves(lora_full), jax.tree.leaves(lora_res)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
