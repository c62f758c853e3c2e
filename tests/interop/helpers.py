"""Test helpers shared by the interop and generation tests."""

from __future__ import annotations

import numpy as np

from apiq_jax.lora import LINEARS, Lora, LoraConfig, lora_from_factors


def random_lora(params, rank: int = 4, seed: int = 0, targets=LINEARS, std: float = 0.1) -> Lora:
    """A LoRA over ``targets`` of every layer of ``params`` with non-zero a and b (``std`` normal entries),
    so that the LoRA path shows in the logits."""
    rng = np.random.default_rng(seed)
    cfg = LoraConfig(rank=rank, alpha=8.0, targets=targets)
    factors = {}
    for i, layer in enumerate(params["layers"]):
        for name in cfg.targets:
            out_f, in_f = layer[name].shape
            factors[f"layers.{i}.{name}"] = (std * rng.standard_normal((in_f, rank)).astype(np.float32),
                                             std * rng.standard_normal((rank, out_f)).astype(np.float32))
    return lora_from_factors(params, cfg, factors)
