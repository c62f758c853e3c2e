"""apiq_jax/compare.py: methods, schemes, labels and options read from the registry; rows measured
the same way for every method; the table and the plot."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from apiq_jax import compare
from apiq_jax.calibration import METHODS, ApiQOptions, get_method
from apiq_jax.lora import LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params, linear_shapes
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig

CFG = ModelConfig("LlamaForCausalLM", 64, 32, 64, 2, 2, 1, 16)
LCFG = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.05)
    rng = np.random.RandomState(0)
    return params, rng.randint(0, 64, size=(2, 16)).astype(np.int32), rng.randint(0, 64, size=(2, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def rows(model):
    params, calib, eval_ids = model
    return compare.compare_methods(params, CFG, calib, eval_ids, ["rtn", "qlora"], bits=2, group_size=32,
                                   lora_config=LCFG)


def test_rows_follow_the_registry(rows):
    assert [r["method"] for r in rows] == ["fp32", "rtn", "qlora"]
    fp, rtn, qlora = rows
    assert fp["bits_per_param"] is None and fp["mean_activation_error"] == 0.0
    for r in (rtn, qlora):
        spec = get_method(r["method"])
        assert r["label"] == spec.label and r["scheme"] == spec.default_scheme and r["bits"] == 2
        assert len(r["activation_errors"]) == CFG.num_hidden_layers and r["mean_activation_error"] > 0
        assert math.isfinite(r["perplexity"]) and r["seconds"] >= 0
    # codes + fp16 scale (+ int16 zero point for asym) per group of 32: exactly 3.0 / 2.5 bits
    assert rtn["bits_per_param"] == pytest.approx(2 + 32 / 32)
    assert qlora["bits_per_param"] == pytest.approx(2 + 16 / 32)
    assert all(in_f % 32 == 0 for _, in_f in linear_shapes(CFG).values())


def test_comparison_options():
    assert compare.comparison_options(get_method("loftq")) == {"num_iter": 5}  # the demo's LoftQ row
    assert compare.comparison_options(get_method("apiq-bw"), epochs=3) == {"options": ApiQOptions(epochs=3)}
    assert compare.comparison_options(get_method("apiq-lw")) == {}
    assert compare.comparison_options(get_method("rtn"), epochs=3) == {}  # only training methods take epochs


def test_unknown_methods_are_refused(model):
    params, calib, eval_ids = model
    with pytest.raises(ValueError, match=r"unknown methods \['awq'\]; accepted: " + ", ".join(METHODS)):
        compare.compare_methods(params, CFG, calib, eval_ids, ["rtn", "awq"])


def test_table_and_plot(rows, tmp_path):
    table = compare.format_table(rows)
    assert table.splitlines()[0] == "| method | bits/param | perplexity | mean act. error | calib. time (s) |"
    assert "| full precision | 32 (fp32) |" in table and "| RTN | 3.000 |" in table and "| QLoRA (NF) |" in table
    tuned = [dict(r, perplexity_finetuned=1.5) for r in rows]
    assert "perplexity after finetuning |" in compare.format_table(tuned)
    png = compare.save_plot(tuned, tmp_path / "plots" / "c.png", "title")
    assert png == tmp_path / "plots" / "c.png" and png.stat().st_size > 10_000


def test_finetuning_after_calibration(model):
    params, calib, eval_ids = model
    qcfg = QuantConfig(bits=2, group_size=32, scheme="asym")
    row = compare.calibrate_and_measure("rtn", params, CFG, calib, eval_ids, qcfg, LCFG, finetune_ids=calib,
                                        finetune_config=FinetuneConfig(steps=2, batch_size=2))
    assert len(row["finetune_losses"]) == 2 and math.isfinite(row["perplexity_finetuned"])
