"""The same command twice gives bit-identical files, for every method (same machine and thread count)."""

from __future__ import annotations

import pytest

from apiq_jax.calibration import METHODS
from apiq_jax.cli import main
from tests.reliability.conftest import finetune_args, quantize_args
from tests.reliability.test_kill_resume import result_files

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", list(METHODS))
def test_quantize_twice_is_bit_identical(tiny_hf, files, tmp_path, method):
    extra = ("--nsamples", "2", "--seqlen", "16", *(("--epochs", "1") if METHODS[method].trains else ()))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([str(a) for a in quantize_args(tiny_hf, out, files["stream"], method, *extra)]) == 0
        runs.append(result_files(out))
    assert runs[0] == runs[1]


def test_finetune_twice_is_bit_identical(tiny_q, files, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([str(a) for a in finetune_args(tiny_q, out, files["calib"], "--steps", "3")]) == 0
        runs.append(result_files(out))
    assert runs[0] == runs[1]
