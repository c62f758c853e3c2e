"""ApiQ options (apiq_jax/calibration/options.py): validation, keyword-only, hashable."""

from __future__ import annotations

import dataclasses

import pytest

from apiq_jax.calibration import ApiQOptions


def test_options_validation():
    with pytest.raises(ValueError, match="b2=1.5"):
        ApiQOptions(b2=1.5)
    with pytest.raises(ValueError, match="lora_lr"):
        ApiQOptions(lora_lr=float("nan"))
    with pytest.raises(ValueError, match="epochs=-1"):
        ApiQOptions(epochs=-1)
    with pytest.raises(ValueError, match="batch_size=0"):
        ApiQOptions(batch_size=0)
    with pytest.raises(ValueError, match="clip_weight_decay"):
        ApiQOptions(clip_weight_decay=-0.1)


def test_reference_defaults_keyword_only_and_hashable():
    opts = ApiQOptions()
    assert (opts.epochs, opts.lora_lr, opts.clip_lr, opts.lora_weight_decay, opts.batch_size, opts.clip_init) == (
        20, 5e-4, 5e-3, 0.1, 1, 4.0)
    with pytest.raises(TypeError):
        ApiQOptions(20)  # keyword-only
    assert hash(ApiQOptions(epochs=2)) == hash(ApiQOptions(epochs=2))
    assert dataclasses.replace(opts, epochs=3).to_dict()["epochs"] == 3


def test_batch_size_must_divide_the_samples():
    ApiQOptions(batch_size=2).check_batching(4)
    with pytest.raises(ValueError, match="batch_size=3 does not divide the 4 calibration samples"):
        ApiQOptions(batch_size=3).check_batching(4)


def test_lora_init_values():
    assert ApiQOptions().lora_init == "default"  # the reference's init
    assert ApiQOptions(lora_init="cloq").to_dict()["lora_init"] == "cloq"
    with pytest.raises(ValueError, match="lora_init='svd' is not supported; accepted: default, loftq, cloq"):
        ApiQOptions(lora_init="svd")
