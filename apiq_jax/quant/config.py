"""Quantization configuration: a frozen, hashable dataclass usable as a static jit argument."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

SCHEMES = ("asym", "sym", "nf")
UNIFORM_BITS = (2, 3, 4, 8)
NF_BITS = (2, 3, 4)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a weight is quantized.

    Attributes:
      bits: code width: 2, 3, 4 or 8 for "asym"/"sym"; 2, 3 or 4 for "nf".
      group_size: run of consecutive weights along the last axis that share one scale
        (and zero point); ``None`` means one group per row.
      scheme: "asym" (zero-point, min/max), "sym" (absmax with the reference's
        ``2^(b-1)-1`` zero point) or "nf" (NormalFloat codebook with per-group absmax).
      double_quant: store the per-group scales themselves in 8 bits (blocks of 256,
        mean subtracted), as QLoRA does.
      scale_dtype: storage dtype of the scales ("float16", "bfloat16" or "float32").
        ``fake_quantize`` rounds the scale to this dtype too, so the simulated and the
        stored weights agree bit for bit.
      dq_block_size: block size of the double quantization.
    """

    bits: int = 2
    group_size: int | None = 64
    scheme: str = "asym"
    double_quant: bool = False
    scale_dtype: str = "float16"
    dq_block_size: int = 256

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is not supported; accepted: {SCHEMES}")
        allowed = NF_BITS if self.scheme == "nf" else UNIFORM_BITS
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in allowed:
            raise ValueError(
                f"bits={self.bits!r} is not supported for scheme {self.scheme!r}; accepted: {allowed}"
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size <= 0
        ):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid; accepted: a positive int or None "
                "(one group per row)"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype={self.scale_dtype!r} is not supported; accepted: {SCALE_DTYPES}"
            )
        if not isinstance(self.dq_block_size, int) or self.dq_block_size <= 0:
            raise ValueError(f"dq_block_size={self.dq_block_size!r} must be a positive int")

    @property
    def qmax(self) -> int:
        """Largest code value, ``2^bits - 1``."""
        return 2**self.bits - 1

    @property
    def jnp_scale_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.scale_dtype)

    def resolve_group_size(self, k: int) -> int:
        """Group size for a last axis of length ``k``.

        Args:
          k: the last axis length.

        Returns:
          ``group_size``, or ``k`` when it is None (one group per row).
        """
        return k if self.group_size is None else self.group_size
