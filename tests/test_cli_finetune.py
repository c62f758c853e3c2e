"""``apiq-jax finetune``: quantize -> finetune -> eval on a tiny model; resume; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apiq_jax.cli import main
from apiq_jax.models import load_quantized
from tests.test_cli_quantize import data, tiny_dir  # noqa: F401  (fixtures)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quantized(tiny_dir, data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("q") / "rtn"
    code = main(["quantize", "--model", str(tiny_dir), "--method", "qlora", "--bits", "2", "--group-size", "32",
                 "--rank", "4", "--alpha", "8", "--calib", str(data["calib"]), "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_finetune_trains_lora_only_and_resumes(quantized, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(quantized), "--data", str(data["calib"]), "--eval", str(data["calib"]),
            "--out", str(out), "--steps", "12", "--batch-size", "3", "--lr", "1e-2", "--save-every", "4",
            "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    res = _last_json(capsys)
    # three fixed windows, 12 steps: the LoRA must fit them better than the QLoRA init (b = 0)
    assert res["final_loss"] < res["first_loss"]
    assert res["perplexity_after"] < res["perplexity_before"]
    assert (out / "loss.png").is_file()

    frozen0, lora0, *_ = load_quantized(quantized)
    frozen1, lora1, _, lcfg, meta = load_quantized(out)
    for a, b in zip(np.asarray(frozen0["layers"][0]["q_proj"].codes), np.asarray(frozen1["layers"][0]["q_proj"].codes)):
        np.testing.assert_array_equal(a, b)  # the quantized weights are untouched
    assert float(np.abs(np.asarray(lora1["layers"][0]["q_proj"]["b"])).max()) > 0  # b left zero init
    assert len(meta["finetune"]["losses"]) == 12

    # eval reads the finetuned directory and agrees with the reported perplexity
    assert main(["eval", "--model", str(out), "--data", str(data["calib"])]) == 0
    assert abs(_last_json(capsys)["perplexity"] / res["perplexity_after"] - 1) < 1e-5

    # re-running the finished command resumes from the last checkpoint: same LoRA, no new steps
    assert main(argv) == 0
    again = _last_json(capsys)
    assert again["final_loss"] == res["final_loss"]
    _, lora2, *_ = load_quantized(out)
    np.testing.assert_array_equal(np.asarray(lora2["layers"][1]["down_proj"]["a"]),
                                  np.asarray(lora1["layers"][1]["down_proj"]["a"]))


@pytest.mark.parametrize("change,message", [
    ({"--model": "HF"}, "not a saved quantized model"),
    ({"--steps": "0"}, "steps=0"),
    ({"--data": "bad"}, "accepted: 0 <= id < 1024"),
])
def test_finetune_errors(quantized, tiny_dir, data, tmp_path, capsys, change, message):  # noqa: F811
    args = {"--model": str(quantized), "--data": str(data["calib"]), "--out": str(tmp_path / "o"), "--steps": "2"}
    for k, v in change.items():
        args[k] = str(tiny_dir) if v == "HF" else (str(data[v]) if v in data else v)
    argv = ["finetune", *[x for kv in args.items() for x in kv], "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_backends_agree_and_pallas_needs_an_accelerator(tiny_dir, data, tmp_path, capsys, monkeypatch):  # noqa: F811
    quantized = tmp_path / "rtn"  # uniform 2-bit weights: the kernels take them (NF falls back to XLA)
    assert main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--bits", "2", "--group-size", "32",
                 "--rank", "4", "--alpha", "8", "--calib", str(data["calib"]), "--out", str(quantized), "--quiet"]) == 0
    from apiq_jax.qmatmul import kernel_supports

    assert kernel_supports(load_quantized(quantized)[0]["layers"][0]["q_proj"])
    import pallas_kernels

    traced = []  # kernel calls while tracing: proves the interpret run really used the kernel
    kernel = pallas_kernels.qmatmul
    monkeypatch.setattr(pallas_kernels, "qmatmul", lambda *a, **k: traced.append(k) or kernel(*a, **k))
    ppl = {}
    for backend in ("xla", "interpret"):
        assert main(["eval", "--model", str(quantized), "--data", str(data["eval"]), "--backend", backend]) == 0
        res = _last_json(capsys)
        assert res["backend"] == backend
        ppl[backend] = res["perplexity"]
        assert bool(traced) == (backend == "interpret"), backend
    assert abs(ppl["interpret"] / ppl["xla"] - 1) < 1e-5, ppl  # the Pallas kernel path computes the same model
    assert main(["finetune", "--model", str(quantized), "--data", str(data["calib"]), "--out", str(tmp_path / "f"),
                 "--steps", "2", "--batch-size", "3", "--backend", "interpret", "--quiet"]) == 0
    assert _last_json(capsys)["backend"] == "interpret"
    assert main(["eval", "--model", str(quantized), "--data", str(data["eval"]), "--backend", "pallas"]) == 2
    assert "needs a GPU or TPU" in capsys.readouterr().err
