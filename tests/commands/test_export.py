"""``apiq-jax export`` (apiq_jax/commands/export.py): the three formats from the CLI, the JSON line,
one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from apiq_jax.commands.outputs import COMPLETE, LOCK_FILE, RUN_FILE, RUNNING, read_marker
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
    assert code == 2 and "is the --model directory; give a new directory" in err and len(err.strip().splitlines()) == 1


def snapshot(path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2 and err.startswith("apiq-jax export: error: ") and fragment in err, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def export(capsys, model, out, fmt="peft", *extra):
    return run_cli(capsys, "export", "--model", str(model), "--format", fmt, "--out", str(out), *extra)


def test_export_out_is_claimed_and_overwrite_replaces_it(capsys, rtn_quantized, tmp_path):
    out = tmp_path / "e"
    assert export(capsys, rtn_quantized, out)[0] == 0
    marker = read_marker(out)
    assert marker["command"] == "export" and marker["state"] == COMPLETE and marker["args"]["format"] == "peft"
    assert not (out / LOCK_FILE).exists() and (out / "apiq_init" / "adapter_config.json").is_file()
    before = snapshot(out)
    for fmt in ("peft", "merged"):  # the same command again, or another format: refused, nothing replaced
        code, _, err = export(capsys, rtn_quantized, out, fmt)
        one_line_error(code, err, f"--out {out} already holds a finished model of `apiq-jax export`")
        assert "pass --overwrite to replace it" in err
        assert snapshot(out) == before
    code, stdout, err = export(capsys, rtn_quantized, out, "merged", "--overwrite")
    assert code == 0, err
    assert last_json(stdout)["adapter"] is None
    assert read_marker(out)["state"] == COMPLETE and read_marker(out)["args"]["format"] == "merged"
    assert not (out / "apiq_init").exists()  # the peft export's adapter is gone: not applied twice on merged W
    frozen, lora, cfg, _ = load_quantized(rtn_quantized)
    ids = np.arange(20, dtype=np.int32).reshape(2, 10)
    np.testing.assert_allclose(np.asarray(load_pretrained(out)(ids)), np.asarray(apply(frozen, lora, ids, cfg)),
                               atol=1e-4, rtol=0)


def test_export_refuses_a_foreign_or_overlapping_out(capsys, rtn_quantized, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    code, _, err = export(capsys, rtn_quantized, mine)
    one_line_error(code, err, f"--out {mine} is a non-empty directory that is not an apiq-jax output")
    assert snapshot(mine) == {"notes.txt": hashlib.sha256(b"my thesis").hexdigest()}
    # an old sharded checkpoint's index there would make loaders read its shards instead of the export
    (mine / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "old-1-of-2.safetensors"}}))
    code, _, err = export(capsys, rtn_quantized, mine, "peft", "--overwrite")
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "my thesis" and (mine / "model.safetensors").is_file()
    assert not (mine / "model.safetensors.index.json").exists()
    frozen, _, _, _ = load_quantized(rtn_quantized)
    np.testing.assert_array_equal(np.asarray(load_pretrained(mine).params["embed_tokens"]),
                                  np.asarray(frozen["embed_tokens"]))
    model = tmp_path / "q"
    shutil.copytree(rtn_quantized, model)
    before = snapshot(model)
    code, _, err = export(capsys, model, model / "exported")
    one_line_error(code, err, f"--out {model / 'exported'} is inside the --model directory {model}")
    code, _, err = export(capsys, model, tmp_path, "peft", "--overwrite")
    one_line_error(code, err, f"--out {tmp_path} holds the --model directory {model}")
    assert snapshot(model) == before and not (model / "exported").exists()


def test_export_of_an_unfinished_model_is_refused(capsys, rtn_quantized, tmp_path):
    model = tmp_path / "killed"
    shutil.copytree(rtn_quantized, model)
    (model / RUN_FILE).write_text(json.dumps({**read_marker(model), "state": RUNNING}))
    code, _, err = export(capsys, model, tmp_path / "e")
    one_line_error(code, err, f"--model {model} is the unfinished output of `apiq-jax quantize` (interrupted, or "
                              "still running); re-run that command to finish it")
    assert not (tmp_path / "e").exists()


def test_a_user_error_after_the_claim_leaves_no_out(capsys, rtn_quantized, tmp_path, monkeypatch):
    """export_model's own errors come before its first write: a new --out is removed, an old one kept as it was."""
    import apiq_jax.interop.export as library

    def refuse(*args, **kwargs):
        raise ValueError("layers.0.q_proj: shape does not fit the GPTQ layout")

    monkeypatch.setattr(library, "write_gptq", refuse)
    code, _, err = export(capsys, rtn_quantized, tmp_path / "new", "gptq")
    one_line_error(code, err, "does not fit the GPTQ layout")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    assert export(capsys, rtn_quantized, old)[0] == 0
    before = snapshot(old)
    code, _, err = export(capsys, rtn_quantized, old, "gptq", "--overwrite")
    one_line_error(code, err, "does not fit the GPTQ layout")
    assert snapshot(old) == before and read_marker(old)["state"] == COMPLETE  # the finished peft export, intact


def test_an_interrupted_export_is_unfinished_until_rerun(capsys, rtn_quantized, tmp_path, monkeypatch):
    """Ctrl-C after every file is written but before the complete marker: import refuses the directory."""
    import apiq_jax.interop.export as library

    real = library.export_model

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    out = tmp_path / "g"
    with monkeypatch.context() as m:
        m.setattr(library, "export_model", interrupted)
        code, _, err = export(capsys, rtn_quantized, out, "gptq")
    assert code == 130, err
    assert read_marker(out)["state"] == RUNNING and not (out / LOCK_FILE).exists()
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(out), "--out", str(tmp_path / "q"))
    assert code == 2 and err.startswith("apiq-jax import: error: ") and len(err.strip().splitlines()) == 1
    assert f"SRC {out} is the unfinished output of `apiq-jax export`" in err
    assert not (tmp_path / "q").exists()
    code, _, err = export(capsys, rtn_quantized, out, "gptq")  # the same command finishes it
    assert code == 0, err
    assert read_marker(out)["state"] == COMPLETE
    assert run_cli(capsys, "import", "--from", "gptq", str(out), "--out", str(tmp_path / "q"))[0] == 0
