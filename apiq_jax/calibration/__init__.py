"""Calibration: ApiQ-bw, ApiQ-lw and the baselines (RTN/QLoRA, LoftQ, GPTQ).

Every method shares one signature (see :mod:`apiq_jax.calibration.common`)::

    method(params, model_config, calib_ids, quant_config, lora_config, *, key, **options)
        -> CalibrationResult(params=frozen, lora=lora, report=report)   # lora: a Lora carrying alpha / r

:data:`METHODS` maps the registry name to the callable.
"""

from __future__ import annotations

from apiq_jax.calibration.apiq import ApiQOptions, apiq_bw, apiq_lw
from apiq_jax.calibration.baselines import gptq_init, loftq_init, qlora_init, rtn_init
from apiq_jax.calibration.common import (
    QUANT_TARGETS,
    BlockReport,
    CalibrationMethod,
    CalibrationReport,
    CalibrationResult,
    block_errors,
    embed_ids,
    freeze_layer,
    freeze_params,
    memory_stats,
    relative_error,
    run_block,
    validate_inputs,
)

#: registry name -> calibration method (the names ``apiq-jax quantize --method`` accepts)
METHODS: dict[str, CalibrationMethod] = {
    "apiq-bw": apiq_bw,
    "apiq-lw": apiq_lw,
    "loftq": loftq_init,
    "qlora": qlora_init,
    "rtn": rtn_init,
    "gptq": gptq_init,
}


def get_method(name: str) -> CalibrationMethod:
    """The registered method called ``name``; ValueError lists the accepted names."""
    if name not in METHODS:
        raise ValueError(f"unknown calibration method {name!r}; accepted: {sorted(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS", "QUANT_TARGETS", "ApiQOptions", "BlockReport", "CalibrationMethod",
    "CalibrationReport", "CalibrationResult", "apiq_bw", "apiq_lw", "block_errors", "embed_ids",
    "freeze_layer", "freeze_params", "get_method", "gptq_init", "loftq_init", "memory_stats",
    "qlora_init", "relative_error", "rtn_init", "run_block", "validate_inputs",
]
