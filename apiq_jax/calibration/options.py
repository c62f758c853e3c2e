"""Hyper-parameters of ApiQ calibration (:class:`ApiQOptions`), shared by ApiQ-bw and ApiQ-lw."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from apiq_jax.quant.clip import CLIP_INIT

__all__ = ["CACHE_DTYPES", "LORA_INITS", "ApiQOptions"]

_COUNTS = {"epochs": 0, "batch_size": 1}  # integer options and their minimum
#: dtypes the activation caches may be stored in
CACHE_DTYPES = ("float32", "bfloat16", "float16")
#: where ApiQ's LoRA starts (:attr:`ApiQOptions.lora_init`): the reference's QLoRA init, LoftQ's
#: (rank-r SVD of ``W - Q``) or CLoQ's (its activation-weighted SVD, :mod:`apiq_jax.calibration.cloq`)
LORA_INITS = ("default", "loftq", "cloq")
_REALS = ("lora_lr", "clip_lr", "lora_weight_decay", "clip_weight_decay", "eps", "clip_init")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiQOptions:
    """Hyper-parameters of ApiQ calibration (frozen, hashable: a static jit argument).

    The defaults are the reference's (``calibrate()`` of the official ApiQ code).

    Attributes:
      epochs: passes over the calibration samples per block (ApiQ-bw) or per stage of
        linears (ApiQ-lw) (reference: 20).
      aug_loss: add the second loss term against ``F_i(x_q; W)`` (reference default: on).
        ApiQ-bw only; ApiQ-lw records it as False.
      lora_lr, clip_lr: AdamW learning rates of the LoRA factors and the clipping logits.
      lora_weight_decay, clip_weight_decay: decoupled weight decay of each group.
      b1, b2, eps: AdamW moments (torch defaults).
      batch_size: samples per step (reference: 1); must divide the number of samples.
      clip_init: initial value of every clipping logit (sigmoid(4.0) = 0.982).
      cache_dtype: dtype the activation caches (the ``[n, seqlen, D]`` streams and targets)
        are stored in: "float32", "bfloat16" or "float16"; None: the model's dtype (its
        embedding table's). Blocks always compute in float32; a float32 cache is exact.
      lora_init: where every block's LoRA starts (one of :data:`LORA_INITS`). "default": the
        reference's QLoRA init (``a`` kaiming-uniform, ``b = 0``). "loftq" / "cloq": fitted in
        closed form to the block's starting quantization error ``W - Q0`` (``Q0`` the weights
        quantized with the clipping logits at ``clip_init``): its rank-r SVD (LoftQ's one
        iteration), or its SVD weighted by the ``X^T X`` of each linear's inputs on the
        quantized stream ``x_q`` (CLoQ, ridge 0.01 of the mean diagonal). With a large
        ``clip_init`` (e.g. 20.0: plain RTN) and ``epochs=0`` the result is LoftQ's
        (``num_iter=1``) and CLoQ's ``sequential=True`` solution for the same scheme.
    """

    epochs: int = 20
    aug_loss: bool = True
    lora_lr: float = 5e-4
    clip_lr: float = 5e-3
    lora_weight_decay: float = 0.1
    clip_weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 1
    clip_init: float = CLIP_INIT
    cache_dtype: str | None = None
    lora_init: str = "default"

    def __post_init__(self) -> None:
        for name, lowest in _COUNTS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lowest:
                raise ValueError(f"{name}={v!r} must be an int >= {lowest}")
            object.__setattr__(self, name, int(v))
        for name in _REALS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite number")
            if name != "clip_init" and v < 0:
                raise ValueError(f"{name}={v!r} must be >= 0")
            object.__setattr__(self, name, float(v))
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"{name}={v!r} must lie in [0, 1)")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "aug_loss", bool(self.aug_loss))
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r} is not supported; accepted: {CACHE_DTYPES} or None")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"lora_init={self.lora_init!r} is not supported; accepted: {', '.join(LORA_INITS)}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict.

        Returns:
          ``{field: value}`` for every field.
        """
        return dataclasses.asdict(self)

    def check_batching(self, n_samples: int) -> None:
        """Check that :attr:`batch_size` divides the number of calibration samples.

        Args:
          n_samples: rows of the calibration ids.

        Returns:
          None.

        Raises:
          ValueError: naming the batch size and the accepted divisors.
        """
        if n_samples % self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not divide the {n_samples} calibration samples; accepted: a "
                f"divisor of {n_samples}"
            )
