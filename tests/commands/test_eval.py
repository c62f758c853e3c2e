"""``apiq-jax eval`` (apiq_jax/commands/eval.py): HF and quantized directories, .npy and .txt
data, backends, the progress bar, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from apiq_jax.evaluate import perplexity, perplexity_ids
from apiq_jax.lora import LoraConfig
from apiq_jax.models import apply, load_pretrained, load_quantized, load_tokenizer, quantize_model, save_quantized
from apiq_jax.quant import QuantConfig
from tests.commands.conftest import last_json, run_cli
from tests.conftest import require_shared


@pytest.fixture(scope="module")
def small_ids(tmp_path_factory):
    ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:12, :128]
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, ids)
    return path, ids


def test_eval_hf_model_on_ids(capsys, stories, small_ids):
    path, ids = small_ids
    code, out, _ = run_cli(capsys, "eval", "--model", str(stories), "--data", str(path), "--batch-size", "5")
    assert code == 0
    res = last_json(out)
    assert {"perplexity", "tokens", "seconds"} <= set(res)
    ref = perplexity_ids(load_pretrained(stories), ids)
    assert res["tokens"] == 12 * 127 and res["quantized"] is False
    assert abs(res["perplexity"] - ref.perplexity) < 1e-6 * ref.perplexity


def test_eval_full_eval_set_reproduces_reference_ppl(capsys, stories):
    data = require_shared("data", "tinystories260K", "eval.npy")
    code, out, _ = run_cli(capsys, "eval", "--model", str(stories), "--data", str(data), "--batch-size", "25")
    assert code == 0
    assert round(last_json(out)["perplexity"], 4) == 3.8281


def test_eval_text_and_one_d_ids(capsys, stories, tmp_path):
    text = require_shared("data", "tinystories260K", "stories.txt").read_text()[:4000]
    txt = tmp_path / "t.txt"
    txt.write_text(text)
    code, out, _ = run_cli(capsys, "eval", "--model", str(stories), "--data", str(txt), "--seqlen", "64")
    assert code == 0
    res = last_json(out)
    ref = perplexity(load_pretrained(stories), text, load_tokenizer(stories), seqlen=64)
    assert res["windows"] == ref.windows and abs(res["perplexity"] - ref.perplexity) < 1e-6 * ref.perplexity
    flat = tmp_path / "flat.npy"
    np.save(flat, np.load(require_shared("data", "tinystories260K", "eval.npy"))[:2].ravel())
    code, out, _ = run_cli(capsys, "eval", "--model", str(stories), "--data", str(flat), "--seqlen", "100")
    res = last_json(out)
    assert code == 0 and res["windows"] == 5 and res["seqlen"] == 100  # 512 tokens -> 5 windows, tail dropped


def test_eval_quantized_directory(capsys, stories, small_ids, tmp_path):
    path, ids = small_ids
    model = load_pretrained(stories)
    lcfg = LoraConfig(rank=4, alpha=8)
    frozen, lora = quantize_model(model.params, QuantConfig(bits=3, group_size=64), lcfg, key=jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01, lora)
    out_dir = save_quantized(tmp_path / "q", frozen, lora, model.config, {"method": "rtn"},
                             tokenizer_source=stories)
    code, out, _ = run_cli(capsys, "eval", "--model", str(out_dir), "--data", str(path))
    assert code == 0
    res = last_json(out)
    ref = perplexity_ids(frozen, ids, config=model.config, lora=lora)
    assert res["quantized"] is True and abs(res["perplexity"] - ref.perplexity) < 1e-5 * ref.perplexity
    logits = apply(frozen, lora, ids[:1], model.config)
    assert np.isfinite(np.asarray(logits)).all()
    # text data works too, with the tokenizer copied into the quantized directory
    txt = tmp_path / "t.txt"
    txt.write_text("Once upon a time, there was a little girl named Lily. " * 20)
    code, out, _ = run_cli(capsys, "eval", "--model", str(out_dir), "--data", str(txt), "--seqlen", "32")
    assert code == 0 and last_json(out)["windows"] > 1


def test_eval_errors(capsys, stories, small_ids, tmp_path):
    path, ids = small_ids
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "missing"), "--data", str(path))
    assert code != 0 and "directory not found" in err and "missing" in err
    csv = tmp_path / "ids.csv"
    csv.write_text("1,2,3")
    code, _, err = run_cli(capsys, "eval", "--model", str(stories), "--data", str(csv))
    assert code != 0 and "unsupported file type '.csv'" in err and ".npy" in err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[1, 2, 600, 4]]))
    code, _, err = run_cli(capsys, "eval", "--model", str(stories), "--data", str(bad))
    assert code != 0 and "token id 600" in err and "0 <= id < 512" in err
    assert "position (0, 2)" in err and err.startswith("apiq-jax eval: error: --data ")
    floats = tmp_path / "floats.npy"
    np.save(floats, np.ones((2, 4)))
    code, _, err = run_cli(capsys, "eval", "--model", str(stories), "--data", str(floats))
    assert code != 0 and "must be integers" in err
    code, _, err = run_cli(capsys, "eval", "--model", str(stories), "--data", str(path), "--seqlen", "64")
    assert code != 0 and "--seqlen 64 differs from the row length 128" in err
    code, _, err = run_cli(capsys, "eval", "--model", str(stories), "--data", str(tmp_path / "nope.npy"))
    assert code != 0 and "file not found" in err
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((stories / name).read_bytes())
    txt = tmp_path / "x.txt"
    txt.write_text("hello there " * 50)
    code, _, err = run_cli(capsys, "eval", "--model", str(no_tok), "--data", str(txt), "--seqlen", "8")
    assert code != 0 and "no tokenizer files" in err


def test_eval_user_errors_are_one_line_exit_2(capsys, tiny_dir, data, tmp_path):
    """Every user error: exit code 2, one ``apiq-jax eval: error:`` line, no traceback."""
    for argv in (
        ["--model", str(tmp_path / "missing"), "--data", str(data["eval"])],
        ["--model", str(tiny_dir), "--data", str(data["bad"])],
        ["--model", str(tiny_dir), "--data", str(data["eval"]), "--batch-size", "0"],
        ["--model", str(tiny_dir), "--data", str(data["eval"]), "--seqlen", "1"],
    ):
        code, out, err = run_cli(capsys, "eval", *argv)
        assert code == 2, argv
        assert out == "" and err.count("\n") == 1 and err.startswith("apiq-jax eval: error: "), err
        assert "Traceback" not in err


def test_eval_on_tiny_quantized_model(capsys, rtn_quantized, data):
    code, out, err = run_cli(capsys, "eval", "--model", str(rtn_quantized), "--data", str(data["eval"]))
    assert code == 0, err
    res = last_json(out)
    frozen, lora, cfg, _ = load_quantized(rtn_quantized)
    ref = perplexity_ids(frozen, np.load(data["eval"]), config=cfg, lora=lora)
    assert res["quantized"] is True and abs(res["perplexity"] / ref.perplexity - 1) < 1e-6
    assert res["windows"] == 4 and res["seqlen"] == 32


def test_progress_bar_counts_batches_and_leaves_scores_alone(rtn_quantized, data, capsys):
    """The bar (stderr) advances once per batch; scores are untouched; --quiet turns it off."""
    frozen, lora, cfg, _ = load_quantized(rtn_quantized)
    ids = np.load(data["eval"])  # 4 rows
    ref = perplexity_ids(frozen, ids, config=cfg, lora=lora, batch_size=3)
    capsys.readouterr()
    res = perplexity_ids(frozen, ids, config=cfg, lora=lora, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "eval:" in err and "0/2 [" in err  # a bar over ceil(4 / 3) = 2 batches
    assert res.perplexity == ref.perplexity
    for quiet in ((), ("--quiet",)):
        code, out, err = run_cli(capsys, "eval", "--model", str(rtn_quantized), "--data", str(data["eval"]),
                                 "--batch-size", "3", *quiet)
        assert code == 0 and last_json(out)["windows"] == 4 and "Traceback" not in err
        assert out.count("\n") == 1  # the bar never writes to stdout
        assert ("eval:" in err) == (not quiet)


def test_backends_agree(capsys, rtn_quantized, data, monkeypatch):
    """``--backend xla`` and ``--backend interpret`` (the Pallas kernel) give the same perplexity."""
    from apiq_jax.qmatmul import kernel_supports

    assert kernel_supports(load_quantized(rtn_quantized)[0]["layers"][0]["q_proj"])
    import pallas_kernels

    traced = []  # kernel calls while tracing: proves the interpret run really used the kernel
    kernel = pallas_kernels.qmatmul
    monkeypatch.setattr(pallas_kernels, "qmatmul", lambda *a, **k: traced.append(k) or kernel(*a, **k))
    ppl = {}
    for backend in ("xla", "interpret"):
        code, out, err = run_cli(capsys, "eval", "--model", str(rtn_quantized), "--data", str(data["eval"]),
                                 "--backend", backend)
        assert code == 0, err
        res = last_json(out)
        assert res["backend"] == backend
        ppl[backend] = res["perplexity"]
        assert bool(traced) == (backend == "interpret"), backend
    assert abs(ppl["interpret"] / ppl["xla"] - 1) < 1e-5, ppl  # the Pallas kernel path computes the same model


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="--backend pallas only fails on a CPU host; a GPU/TPU host runs the kernels")
def test_pallas_backend_needs_an_accelerator(capsys, rtn_quantized, data):
    code, _, err = run_cli(capsys, "eval", "--model", str(rtn_quantized), "--data", str(data["eval"]),
                           "--backend", "pallas")
    assert code == 2
    assert "needs a GPU or TPU" in err
