"""``apiq-jax quantize`` (apiq_jax/commands/quantize.py): quantize -> eval round trip on a tiny
model, calibration data, resume, error cases, the LoftQ iteration constants."""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest

from apiq_jax.cli import main
from apiq_jax.commands import quantize as qcmd
from apiq_jax.models import load_quantized
from apiq_jax.models.llama import LINEARS
from apiq_jax.quant import QuantizedTensor
from tests.commands.conftest import VOCAB, last_json, quantize_args, run_cli


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
    code, stdout, err = run_cli(capsys, *quantize_args(tiny_dir, out, calib_path, method, *extra))
    assert code == 0, err
    summary = last_json(stdout)
    bits = int(extra[extra.index("--bits") + 1]) if "--bits" in extra else 2
    assert summary["method"] == method and summary["bits"] == bits
    assert summary["seconds"] >= 0 and summary["bits_per_param"] > bits
    assert len(summary["activation_errors"]) == 2
    frozen, lora, cfg, meta = load_quantized(out)
    assert meta["method"] == method and lora.rank == 4 and cfg.vocab_size == VOCAB
    assert all(isinstance(frozen["layers"][0][n], QuantizedTensor) for n in LINEARS)
    assert frozen["layers"][0]["q_proj"].bits == bits
    assert (out / "report.json").is_file() and (out / "tokenizer.json").is_file()
    code, stdout, err = run_cli(capsys, "eval", "--model", str(out), "--data", str(data["eval"]))
    assert code == 0, err
    ev = last_json(stdout)
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
    args = quantize_args(tiny_dir, tmp_path / "o", data["calib"], "rtn")
    for flag, value in change.items():
        i = args.index(flag)
        if flag == "--calib":
            value = str(data[value]) if value in data else str(tmp_path / value)
        elif flag == "--model":
            value = str(tmp_path / value)
        args[i + 1] = value
    code, _, err = run_cli(capsys, *args)
    assert code != 0
    assert message in err
    assert code == 2 and err.startswith("apiq-jax quantize: error: ") and "Traceback" not in err


def test_quantize_option_mismatch(tiny_dir, data, tmp_path, capsys):
    code, _, err = run_cli(capsys, *quantize_args(tiny_dir, tmp_path / "o", data["calib"], "rtn", "--epochs", "2"))
    assert code != 0 and "--epochs applies to apiq-bw/apiq-lw only" in err
    code, _, err = run_cli(capsys, *quantize_args(tiny_dir, tmp_path / "o", data["stream"], "rtn",
                                                  "--seqlen", "600"))
    assert code != 0 and "fewer than one window" in err


def test_load_calibration(tiny_dir, data, tmp_path):
    """Rows in order for 2-D ids; seeded random windows (apiq_jax.data.sample_windows) for streams."""
    from apiq_jax.data import sample_windows, tokenize
    from apiq_jax.models import load_tokenizer

    rows = np.load(data["calib"])
    ids = qcmd.load_calibration(data["calib"], tiny_dir, None, None, 0, 128, VOCAB)
    np.testing.assert_array_equal(ids, rows)
    ids = qcmd.load_calibration(data["calib"], tiny_dir, 2, 20, 0, 128, VOCAB)
    np.testing.assert_array_equal(ids, rows[:2, :20])
    stream = np.load(data["stream"])
    ids = qcmd.load_calibration(data["stream"], tiny_dir, 5, 16, 3, 128, VOCAB)
    starts = np.random.default_rng(3).integers(0, stream.size - 16 + 1, size=5)
    np.testing.assert_array_equal(ids, np.stack([stream[s:s + 16] for s in starts]))
    assert ids.dtype == np.int32
    # defaults: DEFAULT_NSAMPLES windows of min(2048, max_len, tokens)
    ids = qcmd.load_calibration(data["stream"], tiny_dir, None, None, 0, 128, VOCAB)
    assert ids.shape == (qcmd.DEFAULT_NSAMPLES, 128)
    text = data["text"].read_text()
    ids = qcmd.load_calibration(data["text"], tiny_dir, 4, 24, 1, 128, VOCAB)
    expected = sample_windows(tokenize(text, load_tokenizer(tiny_dir)), 4, 24, seed=1)
    np.testing.assert_array_equal(ids, expected)
    with pytest.raises(ValueError, match="--nsamples 9 exceeds the 3 rows"):
        qcmd.load_calibration(data["calib"], tiny_dir, 9, None, 0, 128, VOCAB)
    with pytest.raises(ValueError, match="--seqlen 40 exceeds the row length 32"):
        qcmd.load_calibration(data["calib"], tiny_dir, None, 40, 0, 128, VOCAB)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="the text file is empty"):
        qcmd.load_calibration(empty, tiny_dir, None, None, 0, 128, VOCAB)


def test_loftq_iterations_come_from_one_place():
    """quantize's default and the demo's count are the registry's (apiq_jax.calibration.registry)."""
    from apiq_jax import compare
    from apiq_jax.calibration import get_method
    from apiq_jax.commands import demo

    loftq = get_method("loftq")
    assert loftq.options["num_iter"] == 1 and loftq.compare_options == {"num_iter": 5}
    assert compare.comparison_options(loftq) == {"num_iter": 5}  # what the demo actually runs
    assert demo.DEMO_LOFTQ_ITERATIONS == 5 and "5 it." in loftq.label
    opts = qcmd.method_options("loftq", None, None, False)
    assert opts["num_iter"] == loftq.options["num_iter"]
    assert qcmd.method_options("loftq", None, 3, False)["num_iter"] == 3
    assert "num_iter" not in qcmd.method_options("rtn", None, None, False)
    p = argparse.ArgumentParser()
    qcmd.add_arguments(p)
    help_text = " ".join(p.format_help().split())
    assert "LoftQ alternations (default 1" in help_text
    assert "demo runs 5" in help_text


def test_interrupted_quantize_resumes_on_rerun(tiny_dir, data, tmp_path, capsys, monkeypatch):
    """An ApiQ run stopped after block 0 continues there when the same command is re-run."""
    extra = ("--epochs", "1", "--nsamples", "2", "--seqlen", "16")
    full = tmp_path / "full"
    assert run_cli(capsys, *quantize_args(tiny_dir, full, data["stream"], "apiq-bw", *extra))[0] == 0

    class Stop(Exception):
        pass

    def stop_after_block_0(i, report):
        if i == 0:
            raise Stop

    original = qcmd.method_options

    def interrupting(*args, **kwargs):
        return {**original(*args, **kwargs), "on_block_end": stop_after_block_0}

    out = tmp_path / "resumed"
    argv = quantize_args(tiny_dir, out, data["stream"], "apiq-bw", *extra)
    monkeypatch.setattr(qcmd, "method_options", interrupting)
    with pytest.raises(Stop):
        main(argv)
    assert (out / qcmd.WORK_SUBDIR / "streams" / "0").is_dir()  # block 0 was checkpointed
    monkeypatch.setattr(qcmd, "method_options", original)
    assert run_cli(capsys, *argv)[0] == 0
    assert not (out / qcmd.WORK_SUBDIR).exists()  # removed once the model is saved

    *_, meta = load_quantized(out)
    assert meta["report"]["extra"]["resumed_from_block"] == 1
    _, lora_full, *_ = load_quantized(full)
    _, lora_res, *_ = load_quantized(out)
    for a, b in zip(jax.tree.leaves(lora_full), jax.tree.leaves(lora_res)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_draw_windows_alias_is_sample_windows():
    from apiq_jax.data import sample_windows

    stream = np.arange(300)
    np.testing.assert_array_equal(qcmd.draw_windows(stream, 4, 16, 2, "calib"), sample_windows(stream, 4, 16, seed=2))
    with pytest.raises(ValueError, match="calib: only 300 tokens"):
        qcmd.draw_windows(stream, 4, 400, 0, "calib")


def test_sixteen_bit_storage_and_caches(tiny_dir, data, tmp_path, capsys):
    """--dtype bfloat16: the model is read and frozen in bfloat16, embeddings and norms saved so;
    the codes equal a float32 run's (the quantizer works in float32 on the same bfloat16 values)."""
    import jax.numpy as jnp

    from apiq_jax.models.hf_io import load_params
    from apiq_jax.models.quantized import quantize_params
    from apiq_jax.quant import QuantConfig

    out = tmp_path / "bf16"
    code, stdout, err = run_cli(capsys, *quantize_args(tiny_dir, out, data["calib"], "rtn", "--dtype", "bfloat16"))
    assert code == 0, err
    assert last_json(stdout)["dtype"] == "bfloat16"
    frozen, _, _, _ = load_quantized(out)
    assert frozen["embed_tokens"].dtype == jnp.bfloat16 and frozen["layers"][1]["input_layernorm"].dtype == jnp.bfloat16
    assert frozen["layers"][1]["down_proj"].dtype == "bfloat16"
    dense = load_params(tiny_dir, dtype="bfloat16")
    want = quantize_params(dense, QuantConfig(bits=2, group_size=32))
    np.testing.assert_array_equal(np.asarray(frozen["layers"][1]["down_proj"].codes),
                                  np.asarray(want["layers"][1]["down_proj"].codes))
    code, _, err = run_cli(capsys, *quantize_args(tiny_dir, tmp_path / "o2", data["calib"], "apiq-bw", "--epochs", "1",
                                                   "--cache-dtype", "bfloat16"))
    assert code == 0, err
    with pytest.raises(SystemExit) as exc:  # argparse's choices
        run_cli(capsys, *quantize_args(tiny_dir, tmp_path / "o3", data["calib"], "rtn", "--dtype", "int8"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--dtype" in err and "float16" in err and "Traceback" not in err
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("lora_init", ["loftq", "cloq"])
def test_lora_init_flag_starts_apiq_from_the_fitted_factors(tiny_dir, data, tmp_path, capsys, lora_init):
    """``--lora-init`` reaches ApiQOptions: at 0 epochs the saved LoRA is the fitted one (b != 0; the
    default init has b = 0), and the report records the option."""
    out = tmp_path / lora_init
    args = quantize_args(tiny_dir, out, data["stream"], "apiq-bw", "--epochs", "0", "--nsamples", "2",
                         "--seqlen", "16", "--lora-init", lora_init)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    _, lora, _, meta = load_quantized(out)
    assert meta["report"]["options"]["lora_init"] == lora_init
    assert np.abs(np.asarray(lora["layers"][0]["q_proj"]["b"])).max() > 0
    code, _, err = run_cli(capsys, *quantize_args(tiny_dir, tmp_path / "o", data["calib"], "rtn",
                                                  "--lora-init", lora_init))
    assert code == 2 and err.startswith("apiq-jax quantize: error: --lora-init applies to apiq-bw/apiq-lw only")
