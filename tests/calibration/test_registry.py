"""The method registry (apiq_jax/calibration/registry.py): one spec per method, read by the library,
the CLI and the comparisons alike."""

from __future__ import annotations

import argparse
import itertools

import pytest

from apiq_jax.calibration import (
    METHODS,
    MethodSpec,
    apiq_bw,
    apiq_lw,
    cloq_init,
    get_method,
    gptq_init,
    loftq_init,
    qlora_init,
    rtn_init,
)
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.commands import quantize as qcmd
from apiq_jax.quant import QuantConfig
from tests.calibration import resume_worker as W


def test_registry_contents():
    assert list(METHODS) == ["apiq-bw", "apiq-lw", "loftq", "cloq", "qlora", "rtn", "gptq"]
    fns = {"apiq-bw": apiq_bw, "apiq-lw": apiq_lw, "loftq": loftq_init, "cloq": cloq_init, "qlora": qlora_init,
           "rtn": rtn_init, "gptq": gptq_init}
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name and spec.fn is fns[name]
        assert get_method(name) is spec
        assert spec.default_scheme in spec.schemes and spec.bits == (2, 3, 4)
    assert [n for n, s in METHODS.items() if s.trains] == ["apiq-bw", "apiq-lw"]
    assert METHODS["apiq-bw"].schemes == METHODS["apiq-lw"].schemes == ("asym", "sym", "nf")
    assert {n for n, s in METHODS.items() if s.default_scheme == "nf"} == {"qlora", "loftq", "cloq"}
    with pytest.raises(ValueError, match="unknown calibration method 'awq'; accepted: apiq-bw, apiq-lw, loftq"):
        get_method("awq")
    with pytest.raises(TypeError):
        MethodSpec("x", rtn_init, "X", (2,), ("asym",), "asym", False)  # keyword-only


def test_option_defaults_come_from_the_functions():
    loftq = get_method("loftq")
    assert loftq.options == {"num_iter": 1, "measure_error": True}  # peft's default, apiq-jax quantize's
    assert loftq.compare_options == {"num_iter": 5} and "5 it." in loftq.label  # the demo's
    assert set(get_method("apiq-bw").options) == {"options", "lora_init", "work_dir", "on_block_end", "lazy_result",
                                                  "offload_activations"}
    assert get_method("gptq").options["percdamp"] == 0.01


def _cli_refuses(method: str, bits: int, scheme: str) -> bool:
    args = argparse.Namespace(method=method, bits=bits, scheme=scheme, group_size=64, rank=4, nsamples=None,
                              seqlen=None, alpha=16.0, epochs=None, num_iter=None, max_shard_size="2GB")
    try:
        qcmd.check_args(args)
    except ValueError:
        return True
    return False


def test_library_refuses_exactly_what_the_cli_refuses():
    params, ids = W.tiny_setup()
    for method, bits, scheme in itertools.product(METHODS, (2, 3, 4, 8), ("asym", "sym", "nf")):
        if scheme == "nf" and bits == 8:
            continue  # not a QuantConfig at all
        qcfg = QuantConfig(bits, 32, scheme)
        try:
            validate_inputs(method, params, W.CFG, ids, qcfg, W.LCFG)
            refused = False
        except ValueError as e:
            assert f"is not supported by method {method!r}" in str(e)
            refused = True
        assert refused == _cli_refuses(method, bits, scheme), (method, bits, scheme)
