"""``apiq-jax eval``: HF and quantized model directories, .npy and .txt data, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from apiq_jax.cli import build_parser, main
from apiq_jax.evaluate import perplexity, perplexity_ids
from apiq_jax.lora import LoraConfig
from apiq_jax.models import apply, load_pretrained, load_tokenizer, quantize_model, save_quantized
from apiq_jax.quant import QuantConfig
from tests.conftest import REPO_ROOT, require_shared


@pytest.fixture(scope="module")
def stories():
    return require_shared("models", "stories260K")


@pytest.fixture(scope="module")
def small_ids(tmp_path_factory):
    ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:12, :128]
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, ids)
    return path, ids


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_hf_model_on_ids(capsys, stories, small_ids):
    path, ids = small_ids
    code, out, _ = _run(capsys, "eval", "--model", str(stories), "--data", str(path), "--batch-size", "5")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert {"perplexity", "tokens", "seconds"} <= set(res)
    ref = perplexity_ids(load_pretrained(stories), ids)
    assert res["tokens"] == 12 * 127 and res["quantized"] is False
    assert abs(res["perplexity"] - ref.perplexity) < 1e-6 * ref.perplexity


def test_eval_full_eval_set_reproduces_reference_ppl(capsys, stories):
    data = require_shared("data", "tinystories260K", "eval.npy")
    code, out, _ = _run(capsys, "eval", "--model", str(stories), "--data", str(data), "--batch-size", "25")
    assert code == 0
    assert round(json.loads(out.strip().splitlines()[-1])["perplexity"], 4) == 3.8281


def test_eval_text_and_one_d_ids(capsys, stories, tmp_path):
    text = require_shared("data", "tinystories260K", "stories.txt").read_text()[:4000]
    txt = tmp_path / "t.txt"
    txt.write_text(text)
    code, out, _ = _run(capsys, "eval", "--model", str(stories), "--data", str(txt), "--seqlen", "64")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    ref = perplexity(load_pretrained(stories), text, load_tokenizer(stories), seqlen=64)
    assert res["windows"] == ref.windows and abs(res["perplexity"] - ref.perplexity) < 1e-6 * ref.perplexity
    flat = tmp_path / "flat.npy"
    np.save(flat, np.load(require_shared("data", "tinystories260K", "eval.npy"))[:2].ravel())
    code, out, _ = _run(capsys, "eval", "--model", str(stories), "--data", str(flat), "--seqlen", "100")
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["windows"] == 5 and res["seqlen"] == 100  # 512 tokens -> 5 windows, tail dropped


def test_eval_quantized_directory(capsys, stories, small_ids, tmp_path):
    path, ids = small_ids
    model = load_pretrained(stories)
    lcfg = LoraConfig(rank=4, alpha=8)
    frozen, lora = quantize_model(model.params, QuantConfig(bits=3, group_size=64), lcfg, key=jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01, lora)
    out_dir = save_quantized(tmp_path / "q", frozen, lora, model.config, lcfg, {"method": "rtn"},
                             tokenizer_source=stories)
    code, out, _ = _run(capsys, "eval", "--model", str(out_dir), "--data", str(path))
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    ref = perplexity_ids(frozen, ids, config=model.config, lora=lora, lora_scale=lcfg.scale)
    assert res["quantized"] is True and abs(res["perplexity"] - ref.perplexity) < 1e-5 * ref.perplexity
    logits = apply(frozen, lora, ids[:1], model.config, lora_scale=lcfg.scale)
    assert np.isfinite(np.asarray(logits)).all()
    # text data works too, with the tokenizer copied into the quantized directory
    txt = tmp_path / "t.txt"
    txt.write_text("Once upon a time, there was a little girl named Lily. " * 20)
    code, out, _ = _run(capsys, "eval", "--model", str(out_dir), "--data", str(txt), "--seqlen", "32")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["windows"] > 1


def test_eval_errors(capsys, stories, small_ids, tmp_path):
    path, ids = small_ids
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path / "missing"), "--data", str(path))
    assert code != 0 and "directory not found" in err and "missing" in err
    csv = tmp_path / "ids.csv"
    csv.write_text("1,2,3")
    code, _, err = _run(capsys, "eval", "--model", str(stories), "--data", str(csv))
    assert code != 0 and "unsupported file type '.csv'" in err and ".npy" in err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[1, 2, 600, 4]]))
    code, _, err = _run(capsys, "eval", "--model", str(stories), "--data", str(bad))
    assert code != 0 and "token id 600" in err and "0 <= id < 512" in err
    floats = tmp_path / "floats.npy"
    np.save(floats, np.ones((2, 4)))
    code, _, err = _run(capsys, "eval", "--model", str(stories), "--data", str(floats))
    assert code != 0 and "must be integers" in err
    code, _, err = _run(capsys, "eval", "--model", str(stories), "--data", str(path), "--seqlen", "64")
    assert code != 0 and "--seqlen 64 differs from the row length 128" in err
    code, _, err = _run(capsys, "eval", "--model", str(stories), "--data", str(tmp_path / "nope.npy"))
    assert code != 0 and "file not found" in err
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((stories / name).read_bytes())
    txt = tmp_path / "x.txt"
    txt.write_text("hello there " * 50)
    code, _, err = _run(capsys, "eval", "--model", str(no_tok), "--data", str(txt), "--seqlen", "8")
    assert code != 0 and "no tokenizer files" in err


def test_parser_registers_subcommands_in_one_place():
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([])
    assert e.value.code != 0
    args = parser.parse_args(["eval", "--model", "m", "--data", "d.npy"])
    assert args.command == "eval" and args.batch_size == 8 and args.seqlen is None and callable(args.func)


def test_module_entry_point_exit_codes(stories, small_ids, tmp_path):
    """``python -m apiq_jax.cli``: JSON as the last stdout line; non-zero exit on bad input."""
    path, _ = small_ids
    ok = subprocess.run([sys.executable, "-m", "apiq_jax.cli", "eval", "--model", str(stories), "--data", str(path)],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "perplexity" in json.loads(ok.stdout.strip().splitlines()[-1])
    bad = subprocess.run([sys.executable, "-m", "apiq_jax.cli", "eval", "--model", str(tmp_path / "x"),
                          "--data", str(path)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "apiq-jax eval: error:" in bad.stderr
