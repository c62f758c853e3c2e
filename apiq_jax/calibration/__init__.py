"""Calibration: ApiQ-bw, ApiQ-lw and the baselines (RTN/QLoRA, LoftQ, GPTQ).

Every method shares one signature::

    method(params, model_config, calib_ids, quant_config, lora_config, *, key, progress=False, **options)
        -> CalibrationResult(params=frozen, lora=lora, report=report)

:data:`METHODS` (:mod:`~apiq_jax.calibration.registry`) maps each registry name to its
:class:`MethodSpec`: the function, its label, the bits and schemes it accepts, its default
scheme and options.

Modules, by job:

* the block loop: :mod:`.driver` (one driver for every method), :mod:`.blocks` (streams,
  freezing), :mod:`.stages` (the linears of a block in stages and their inputs);
* ApiQ: :mod:`.apiq` (shared wiring), :mod:`.apiq_bw` / :mod:`.apiq_bw_core`,
  :mod:`.apiq_lw` / :mod:`.apiq_lw_core` (wiring / math), :mod:`.options`, :mod:`.adamw`;
* baselines: :mod:`.rtn` (RTN, QLoRA), :mod:`.loftq`, :mod:`.cloq` / :mod:`.cloq_core`, :mod:`.gptq` / :mod:`.gptq_core`,
  :mod:`.baseline` (their shared result);
* around them: :mod:`.inputs` (validation), :mod:`.reports`, :mod:`.workdir` (resumable
  runs), :mod:`.progress` (bars), :mod:`.registry`.
"""

from __future__ import annotations

from apiq_jax.calibration.apiq_bw import apiq_bw
from apiq_jax.calibration.apiq_lw import apiq_lw
from apiq_jax.calibration.cloq import cloq_init
from apiq_jax.calibration.cloq_core import cloq_factors
from apiq_jax.calibration.gptq import gptq_init
from apiq_jax.calibration.loftq import loftq_init
from apiq_jax.calibration.options import LORA_INITS, ApiQOptions
from apiq_jax.calibration.registry import METHODS, MethodSpec, get_method
from apiq_jax.calibration.reports import BlockReport, CalibrationReport, CalibrationResult
from apiq_jax.calibration.rtn import qlora_init, rtn_init

__all__ = [
    "LORA_INITS", "METHODS", "ApiQOptions", "BlockReport", "CalibrationReport", "CalibrationResult", "MethodSpec", "apiq_bw",
    "apiq_lw", "cloq_factors", "cloq_init", "get_method", "gptq_init", "loftq_init", "qlora_init", "rtn_init",
]
