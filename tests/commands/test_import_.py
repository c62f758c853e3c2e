"""``apiq-jax import`` (apiq_jax/commands/import_.py): GPTQ and official-ApiQ directories from the CLI,
bit-identical round trips, one-line errors."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from apiq_jax.commands.outputs import COMPLETE, LOCK_FILE, RUNNING, read_marker
from apiq_jax.models import load_quantized
from tests.commands.conftest import last_json, run_cli


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_import_gptq_and_apiq_round_trip(capsys, rtn_quantized, tmp_path):
    frozen, lora, _, _ = load_quantized(rtn_quantized)
    for fmt, source, extra in (("gptq", "gptq", []), ("peft", "apiq", ["--bits", "2", "--group-size", "32"])):
        assert run_cli(capsys, "export", "--model", str(rtn_quantized), "--format", fmt,
                       "--out", str(tmp_path / fmt))[0] == 0
        code, out, err = run_cli(capsys, "import", "--from", source, str(tmp_path / fmt),
                                 "--out", str(tmp_path / f"q_{fmt}"), *extra)
        assert code == 0, err
        assert last_json(out)["source"] == source
        f2, l2, _, _ = load_quantized(tmp_path / f"q_{fmt}")
        assert _same(f2, frozen) and _same(l2, lora)


def test_import_errors_are_one_line(capsys, rtn_quantized, tmp_path):
    assert run_cli(capsys, "export", "--model", str(rtn_quantized), "--format", "peft", "--out",
                   str(tmp_path / "p"))[0] == 0
    for argv, message in (
        (["--from", "apiq", str(tmp_path / "p"), "--out", str(tmp_path / "a")], "--from apiq needs --bits"),
        (["--from", "apiq", str(tmp_path / "p"), "--out", str(tmp_path / "b"), "--bits", "2", "--group-size", "64"],
         "distinct values, more than 2^2 = 4"),
        (["--from", "gptq", str(tmp_path / "p"), "--out", str(tmp_path / "c")],
         "no quantization_config with quant_method 'gptq'"),
        (["--from", "gptq", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "directory not found"),
    ):
        code, _, err = run_cli(capsys, "import", *argv)
        assert code == 2 and err.startswith("apiq-jax import: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def snapshot(path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, fragment: str, command: str = "import") -> None:
    assert code == 2 and err.startswith(f"apiq-jax {command}: error: ") and fragment in err, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def gptq_export(capsys, model, out):
    assert run_cli(capsys, "export", "--model", str(model), "--format", "gptq", "--out", str(out))[0] == 0
    return out


def test_import_out_is_claimed_and_overwrite_replaces_it(capsys, rtn_quantized, tmp_path):
    g = gptq_export(capsys, rtn_quantized, tmp_path / "g")
    out = tmp_path / "q"
    assert run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(out))[0] == 0
    marker = read_marker(out)
    assert marker["command"] == "import" and marker["state"] == COMPLETE and not (out / LOCK_FILE).exists()
    assert marker["args"]["src"] == str(g.resolve())
    before = snapshot(out)
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(out))
    one_line_error(code, err, f"--out {out} already holds a finished model of `apiq-jax import`; pass --overwrite")
    assert snapshot(out) == before
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert read_marker(out)["state"] == COMPLETE
    assert {k: v for k, v in snapshot(out).items() if k != ".apiq-jax-run.json"} == \
        {k: v for k, v in before.items() if k != ".apiq-jax-run.json"}  # the same import, the same files
    other = gptq_export(capsys, rtn_quantized, tmp_path / "g2")  # another command's output as --out
    before = snapshot(other)
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(other))
    one_line_error(code, err, f"--out {other} holds the output of `apiq-jax export`; pass --overwrite")
    assert snapshot(other) == before
    for bad, fragment in ((g, f"--out {g} is the SRC directory; give a new directory"),
                          (g / "q", f"--out {g / 'q'} is inside the SRC directory {g}"),
                          (tmp_path, f"--out {tmp_path} holds the SRC directory {g}")):
        before = snapshot(g)
        code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(bad), "--overwrite")
        one_line_error(code, err, fragment)
        assert snapshot(g) == before and not (g / "q").exists()


def test_an_interrupted_import_is_refused_by_eval_export_and_finetune(capsys, rtn_quantized, data, tmp_path,
                                                                      monkeypatch):
    """Ctrl-C after the model files are written but before the complete marker (the import's last write)."""
    import apiq_jax.interop.importer as library

    g = gptq_export(capsys, rtn_quantized, tmp_path / "g")
    out = tmp_path / "q"
    real = library.save_quantized

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(library, "save_quantized", interrupted)
        code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(out))
    assert code == 130, err
    assert (out / "apiq_meta.json").is_file() and read_marker(out)["state"] == RUNNING  # looks complete, is not
    unfinished = f"--model {out} is the unfinished output of `apiq-jax import` (interrupted, or still running)"
    code, _, err = run_cli(capsys, "eval", "--model", str(out), "--data", str(data["eval"]), "--quiet")
    one_line_error(code, err, unfinished, "eval")
    code, _, err = run_cli(capsys, "export", "--model", str(out), "--format", "peft", "--out", str(tmp_path / "e"))
    one_line_error(code, err, unfinished, "export")
    code, _, err = run_cli(capsys, "finetune", "--model", str(out), "--data", str(data["eval"]), "--out",
                           str(tmp_path / "ft"), "--steps", "1", "--batch-size", "2", "--quiet")
    one_line_error(code, err, unfinished, "finetune")
    assert not (tmp_path / "e").exists() and not (tmp_path / "ft").exists()
    code, _, err = run_cli(capsys, "import", "--from", "apiq", str(g), "--out", str(out), "--bits", "2")
    one_line_error(code, err, f"--out {out} holds an interrupted run with other arguments: --bits 2 (the run in "
                              "--out used None); --from apiq (the run in --out used gptq); re-run with the same")
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(g), "--out", str(out))  # the same command
    assert code == 0, err
    assert read_marker(out)["state"] == COMPLETE
    code, stdout, err = run_cli(capsys, "eval", "--model", str(out), "--data", str(data["eval"]), "--quiet")
    assert code == 0, err
    assert np.isfinite(last_json(stdout)["perplexity"])


def test_import_sharded_gptq_and_a_missing_shard(capsys, rtn_quantized, tmp_path):
    from tests.interop.helpers import shard_gptq_dir

    g = gptq_export(capsys, rtn_quantized, tmp_path / "g")
    sharded, names = shard_gptq_dir(g, tmp_path / "s", n=2)
    code, stdout, err = run_cli(capsys, "import", "--from", "gptq", str(sharded), "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert last_json(stdout)["files"] == 2
    frozen, lora, _, _ = load_quantized(rtn_quantized)
    f2, l2, _, _ = load_quantized(tmp_path / "q")
    assert _same(f2, frozen) and _same(l2, lora)
    (sharded / names[0]).unlink()
    index = sharded / "model.safetensors.index.json"
    code, _, err = run_cli(capsys, "import", "--from", "gptq", str(sharded), "--out", str(tmp_path / "q2"))
    one_line_error(code, err, f"{index} names 1 shard(s) missing from {sharded}: {names[0]}; the checkpoint is "
                              "incomplete")
    assert not (tmp_path / "q2").exists()
    assert json.loads(index.read_text())["weight_map"]  # the index itself untouched
