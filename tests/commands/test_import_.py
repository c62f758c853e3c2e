"""``apiq-jax import`` (apiq_jax/commands/import_.py): GPTQ and official-ApiQ directories from the CLI,
bit-identical round trips, one-line errors."""

from __future__ import annotations

import jax
import numpy as np

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
