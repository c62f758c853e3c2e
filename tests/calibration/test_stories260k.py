"""ApiQ-bw against the baselines on a real pretrained model (stories260K, 2 bits, group 64).

CI-sized: 16 calibration windows of 128 tokens, 4 ApiQ epochs, 16 evaluation windows. The
claims checked are the paper's: ApiQ-bw gives a lower perplexity than RTN, QLoRA and LoftQ
and a lower activation error in every block.
"""

from __future__ import annotations

import numpy as np
import pytest

from apiq_jax.compare import compare_methods
from apiq_jax.lora import LoraConfig
from apiq_jax.models import load_pretrained
from apiq_jax.models.llama import linear_shapes
from tests.conftest import require_shared

BASELINES = ("rtn", "qlora", "loftq")


@pytest.fixture(scope="module")
def rows():
    model = load_pretrained(require_shared("models", "stories260K"))
    data = require_shared("data", "tinystories260K")
    calib = np.load(data / "calib.npy")[:16, :128]
    eval_ids = np.load(data / "eval.npy")[:16]
    out = compare_methods(
        model.params, model.config, calib, eval_ids, BASELINES + ("apiq-bw",), bits=2, group_size=64,
        lora_config=LoraConfig(rank=8, alpha=16.0), epochs=4, seed=0,
    )
    return {r["method"]: r for r in out}


def test_apiq_bw_has_lowest_perplexity(rows):
    apiq = rows["apiq-bw"]["perplexity"]
    for name in BASELINES:
        assert apiq < rows[name]["perplexity"], (name, apiq, rows[name]["perplexity"])
    # by a wide margin: measured 82 against 381 (LoftQ), 406 (RTN) and 5767 (QLoRA) with
    # these CI settings (fp32: 3.43)
    assert apiq < 0.5 * min(rows[name]["perplexity"] for name in BASELINES)


def test_apiq_bw_has_lowest_activation_error_in_every_block(rows):
    apiq = np.asarray(rows["apiq-bw"]["activation_errors"])
    assert apiq.shape == (5,)
    for name in BASELINES:
        other = np.asarray(rows[name]["activation_errors"])
        assert np.all(apiq < other), (name, apiq.tolist(), other.tolist())


def _stored_bits_per_param(config, bits: int, group: int, scheme: str) -> float:
    """Codes (rows padded to whole groups and to multiples of 32 codes) + fp16 scales (+ int16 zero points)."""
    stored = weights = 0
    for out_f, in_f in linear_shapes(config).values():
        groups = -(-in_f // group)
        codes = -(-groups * group // 32) * 32 * bits
        stored += out_f * (codes + groups * (16 + (16 if scheme == "asym" else 0)))
        weights += out_f * in_f
    return stored / weights


def test_two_bit_storage(rows):
    config = load_pretrained(require_shared("models", "stories260K")).config
    for name in BASELINES + ("apiq-bw",):
        # 2-bit codes + fp16 constants per group of 64 (2.25 / 2.5 bits), plus the padding of
        # the 172-wide down_proj input to 192 columns, which is stored too
        want = _stored_bits_per_param(config, 2, 64, rows[name]["scheme"])
        assert rows[name]["bits_per_param"] == pytest.approx(want, rel=1e-12), (name, want)


def test_bfloat16_storage_and_compute_within_three_percent_of_float32(rows):
    """ApiQ-bw at 2 bits with the weights, caches and evaluation in bfloat16 (blocks calibrated
    in float32 from the bfloat16 values) against the float32 run of ``rows`` (same settings)."""
    from apiq_jax.models.llama import cast_params

    model = load_pretrained(require_shared("models", "stories260K"))
    data = require_shared("data", "tinystories260K")
    calib = np.load(data / "calib.npy")[:16, :128]
    eval_ids = np.load(data / "eval.npy")[:16]
    out = compare_methods(
        cast_params(model.params, "bfloat16"), model.config, calib, eval_ids, ("apiq-bw",), bits=2, group_size=64,
        lora_config=LoraConfig(rank=8, alpha=16.0), epochs=4, seed=0,
    )
    (row,) = [r for r in out if r["method"] == "apiq-bw"]
    fp32 = rows["apiq-bw"]["perplexity"]
    assert row["perplexity"] == pytest.approx(fp32, rel=0.03), (row["perplexity"], fp32)
