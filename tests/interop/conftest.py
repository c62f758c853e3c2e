"""Fixtures of the interop tests: a tiny random HF Llama and its quantized forms with a non-zero LoRA."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from apiq_jax.lora import LoraConfig
from apiq_jax.models import quantize_model, save_quantized
from apiq_jax.models.hf_io import load_config, load_params
from apiq_jax.quant import QuantConfig
from tests.conftest import require_module
from tests.interop.helpers import random_lora


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(HF dir, ModelConfig, params) of a random 2-layer Llama (hidden 64, MLP 96, GQA)."""
    require_module("torch")
    from tests.models.hf_helpers import save_hf_model

    _, d = save_hf_model("llama", tmp_path_factory.mktemp("tiny") / "hf")
    return d, load_config(d), load_params(d)


@pytest.fixture(scope="session")
def quantized(tiny, tmp_path_factory):
    """Factory ``(bits, scheme) -> (qdir, frozen, lora)``: RTN-quantized every linear, group 32, cached."""
    _, config, params = tiny
    cache: dict[tuple[int, str], tuple[Path, dict, object]] = {}

    def make(bits: int = 2, scheme: str = "asym"):
        if (bits, scheme) not in cache:
            frozen, lora = quantize_model(params, QuantConfig(bits=bits, group_size=32, scheme=scheme),
                                          LoraConfig(rank=4), key=jax.random.key(0))
            lora = random_lora(frozen)
            d = save_quantized(tmp_path_factory.mktemp(f"q{bits}{scheme}"), frozen, lora, config)
            cache[bits, scheme] = (d, frozen, lora)
        return cache[bits, scheme]

    return make
