"""The one registry of calibration methods: :data:`METHODS` maps a name to its :class:`MethodSpec`.

Everything that lists, labels or validates methods reads it: the library itself (every
method refuses the bits and schemes its spec does not accept), ``apiq-jax quantize``
(``--method``, ``--bits``, ``--scheme`` and their defaults), ``apiq-jax demo`` and
:mod:`apiq_jax.compare` (labels, schemes, the LoftQ iteration count of comparisons).

Every ``spec.fn`` has the signature::

    fn(params, model_config, calib_ids, quant_config, lora_config, *, key, progress=False,
       **options) -> CalibrationResult
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from apiq_jax.calibration.apiq_bw import apiq_bw
from apiq_jax.calibration.apiq_lw import apiq_lw
from apiq_jax.calibration.cloq import cloq_init
from apiq_jax.calibration.gptq import gptq_init
from apiq_jax.calibration.loftq import loftq_init
from apiq_jax.calibration.reports import CalibrationResult
from apiq_jax.calibration.rtn import qlora_init, rtn_init
from apiq_jax.quant import QuantConfig
from apiq_jax.quant.config import SCHEMES

__all__ = ["METHODS", "MethodSpec", "get_method"]

#: LoftQ alternations in side-by-side comparisons (``apiq-jax demo``, :mod:`apiq_jax.compare`);
#: ``loftq_init`` and ``apiq-jax quantize`` default to peft's 1
LOFTQ_COMPARE_ITERATIONS = 5
_COMMON = ("key", "progress")  # keyword arguments every method takes; not method options


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One calibration method: its function and what it accepts.

    Attributes:
      name: the registry name (``apiq-jax quantize --method``).
      fn: the calibration function.
      label: how tables and plots name it.
      bits: accepted weight bit widths.
      schemes: accepted quantizer schemes ("asym", "sym", "nf").
      default_scheme: the scheme used when none is chosen (QLoRA and LoftQ store NormalFloat).
      trains: whether it trains (clipping logits and LoRA, over ``epochs``).
      compare_options: options that comparisons (the demo, :mod:`apiq_jax.compare`) pass on
        top of :attr:`options`.
    """

    name: str
    fn: Callable[..., CalibrationResult]
    label: str
    bits: tuple[int, ...]
    schemes: tuple[str, ...]
    default_scheme: str
    trains: bool
    compare_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """The method's keyword options and their defaults, read from :attr:`fn`'s signature.

        Returns:
          ``{option: default}`` for every keyword-only argument but ``key`` and ``progress``
          (e.g. ``{"num_iter": 1, "measure_error": True}`` for LoftQ).
        """
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}

    def check_quant_config(self, quant_config: QuantConfig) -> None:
        """Refuse bits or a scheme this method does not accept.

        Args:
          quant_config: the quantizer config of a call.

        Returns:
          None.

        Raises:
          ValueError: naming the value and the accepted ones.
        """
        if quant_config.bits not in self.bits:
            raise ValueError(
                f"bits={quant_config.bits} is not supported by method {self.name!r}; accepted: "
                f"{', '.join(map(str, self.bits))}"
            )
        if quant_config.scheme not in self.schemes:
            raise ValueError(
                f"scheme={quant_config.scheme!r} is not supported by method {self.name!r}; accepted: "
                f"{', '.join(self.schemes)}"
            )


_BITS = (2, 3, 4)

#: registry name -> :class:`MethodSpec`, in the order the CLI lists them (ApiQ learns each group's
#: clipping on every grid of :data:`~apiq_jax.quant.config.SCHEMES`)
METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(name="apiq-bw", fn=apiq_bw, label="ApiQ-bw", bits=_BITS, schemes=SCHEMES,
                   default_scheme="asym", trains=True),
        MethodSpec(name="apiq-lw", fn=apiq_lw, label="ApiQ-lw", bits=_BITS, schemes=SCHEMES,
                   default_scheme="asym", trains=True),
        MethodSpec(name="loftq", fn=loftq_init, label=f"LoftQ (NF, {LOFTQ_COMPARE_ITERATIONS} it.)", bits=_BITS,
                   schemes=("nf", "asym", "sym"), default_scheme="nf", trains=False,
                   compare_options={"num_iter": LOFTQ_COMPARE_ITERATIONS}),
        MethodSpec(name="cloq", fn=cloq_init, label="CLoQ", bits=_BITS, schemes=("nf", "asym", "sym"),
                   default_scheme="nf", trains=False),
        MethodSpec(name="qlora", fn=qlora_init, label="QLoRA (NF)", bits=_BITS, schemes=("nf", "asym", "sym"),
                   default_scheme="nf", trains=False),
        MethodSpec(name="rtn", fn=rtn_init, label="RTN", bits=_BITS, schemes=("asym", "sym", "nf"),
                   default_scheme="asym", trains=False),
        MethodSpec(name="gptq", fn=gptq_init, label="GPTQ-LoRA", bits=_BITS, schemes=("asym", "sym", "nf"),
                   default_scheme="asym", trains=False),
    )
}


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``.

    Args:
      name: a key of :data:`METHODS`.

    Returns:
      Its spec (call ``spec.fn(...)`` to calibrate).

    Raises:
      ValueError: an unknown name; the message lists the accepted ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown calibration method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]
