"""LoRA parameters as a pytree kept separate from the frozen (quantized) weights.

A LoRA tree mirrors the model params: ``{"layers": [{"q_proj": {"a": [in, r],
"b": [r, out]}, ...}, ...]}``, one entry per targeted linear. A targeted linear computes
``y = x @ W.T + (alpha / r) * (x @ a) @ b`` (``W`` in PyTorch ``[out, in]`` layout), so the
dense equivalent is ``W + (alpha / r) * (a @ b).T``.

This module knows the params layout (``params["layers"][i][name]``) but nothing about
the model math.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.quant import QuantizedTensor, dequantize

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ALIASES = {t.split("_")[0]: t for t in ALL_TARGETS}  # "q" -> "q_proj", "gate" -> "gate_proj"
INIT_METHODS = ("qlora", "zeros")

LoraTree = dict[str, Any]


def normalize_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical target names from names or short aliases ("q", "gate", ...) or "all".

    Accepts a comma-separated string too. Raises ValueError naming the unknown entry.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        if t == "all":
            out.extend(ALL_TARGETS)
            continue
        name = _ALIASES.get(t, t)
        if name not in ALL_TARGETS:
            raise ValueError(
                f"unknown LoRA/quantization target {t!r}; accepted: {ALL_TARGETS} "
                f"(or the short forms {tuple(_ALIASES)}, or 'all')"
            )
        out.append(name)
    if not out:
        raise ValueError(f"targets must name at least one linear; accepted: {ALL_TARGETS}")
    return tuple(t for t in ALL_TARGETS if t in set(out))  # canonical order, no duplicates


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (hashable, usable as a static jit argument).

    Attributes:
      rank: r, the inner dimension of ``a [in, r]`` and ``b [r, out]``.
      alpha: scaling numerator; the LoRA term is multiplied by ``alpha / rank``.
      targets: which linears of every layer get LoRA factors (canonical names
        "q_proj" ... "down_proj"; short forms like "q" or "gate" are accepted and
        normalised).
    """

    rank: int = 64
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank={self.rank!r} must be a positive int")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(
            self.alpha
        ) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} must be a positive finite number")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return lora_scale(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]))


def lora_scale(config: LoraConfig) -> float:
    """The LoRA scaling ``alpha / r``."""
    return config.alpha / config.rank


def _weight_shape(w: Any, where: str) -> tuple[int, int]:
    shape = tuple(w.shape)
    if len(shape) != 2:
        raise ValueError(f"{where}: expected a 2-D [out, in] weight, got shape {shape}")
    return shape  # type: ignore[return-value]


def _layers(params: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError("params must be a dict with a 'layers' list (the model params pytree)")
    return params["layers"]


@partial(jax.jit, static_argnums=(1, 2))
def _kaiming_uniform(key: jax.Array, in_features: int, rank: int) -> jnp.ndarray:
    """``U(-1/sqrt(in), 1/sqrt(in))`` of shape ``[in, rank]`` (float32)."""
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, (in_features, rank), jnp.float32, -bound, bound)


def init_lora(
    params: Mapping[str, Any],
    config: LoraConfig,
    key: jax.Array,
    *,
    method: str = "qlora",
    dtype: Any = jnp.float32,
) -> LoraTree:
    """Fresh LoRA factors for every targeted linear of ``params``.

    ``method="qlora"``: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` (what peft's
    ``kaiming_uniform_(a=sqrt(5))`` gives) and ``b = 0``, so the model output is unchanged.
    ``method="zeros"``: both zero (placeholders to be overwritten).
    Linear leaves may be dense or QuantizedTensor (only the shape is used).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method={method!r} is not supported; accepted: {INIT_METHODS}")
    layers = _layers(params)
    keys = jax.random.split(key, max(1, len(layers) * len(config.targets)))
    out_layers = []
    n = 0
    for i, layer in enumerate(layers):
        entry = {}
        for name in config.targets:
            if name not in layer:
                raise ValueError(f"layer {i} has no linear {name!r} (targets={config.targets})")
            out_f, in_f = _weight_shape(layer[name], f"layers.{i}.{name}")
            if method == "qlora":
                a = _kaiming_uniform(keys[n], in_f, config.rank).astype(dtype)
            else:
                a = jnp.zeros((in_f, config.rank), dtype)
            entry[name] = {"a": a, "b": jnp.zeros((config.rank, out_f), dtype)}
            n += 1
        out_layers.append(entry)
    return {"layers": out_layers}


def lora_from_factors(
    params: Mapping[str, Any],
    config: LoraConfig,
    factors: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
) -> LoraTree:
    """A LoRA tree from given factors, validated against ``params`` and ``config``.

    ``factors`` is either a LoRA tree (``{"layers": [{name: {"a", "b"}}]}``) or a flat
    mapping ``{"layers.<i>.<name>": (a, b)}`` / ``{"layers.<i>.<name>": {"a", "b"}}``.
    Each ``a`` must be ``[in, rank]`` and ``b`` ``[rank, out]`` for that linear; every
    targeted linear must be given. Raises ValueError naming the bad entry.
    """
    layers = _layers(params)
    if "layers" in factors:
        flat = {
            f"layers.{i}.{name}": ab
            for i, layer in enumerate(factors["layers"])
            for name, ab in layer.items()
        }
    else:
        flat = dict(factors)
    expected = {f"layers.{i}.{n}" for i in range(len(layers)) for n in config.targets}
    unknown = sorted(set(flat) - expected)
    missing = sorted(expected - set(flat))
    if unknown or missing:
        raise ValueError(
            f"LoRA factors do not match targets {config.targets} over {len(layers)} layers: "
            f"missing {missing[:6]}, unexpected {unknown[:6]}"
        )
    out_layers = []
    for i, layer in enumerate(layers):
        entry = {}
        for name in config.targets:
            key = f"layers.{i}.{name}"
            ab = flat[key]
            a, b = (ab["a"], ab["b"]) if isinstance(ab, Mapping) else ab
            out_f, in_f = _weight_shape(layer[name], key)
            if tuple(a.shape) != (in_f, config.rank) or tuple(b.shape) != (config.rank, out_f):
                raise ValueError(
                    f"{key}: got a {tuple(a.shape)}, b {tuple(b.shape)}; expected a {(in_f, config.rank)} "
                    f"and b {(config.rank, out_f)} (rank {config.rank}, weight [out={out_f}, in={in_f}])"
                )
            entry[name] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
        out_layers.append(entry)
    return {"layers": out_layers}


def lora_delta(ab: Mapping[str, jnp.ndarray], scale: float) -> jnp.ndarray:
    """Dense ``[out, in]`` update ``scale * (a @ b).T`` of one linear."""
    a = ab["a"].astype(jnp.float32)
    b = ab["b"].astype(jnp.float32)
    return scale * (a @ b).T


def merge_lora(params: Mapping[str, Any], lora: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """Fold LoRA into dense weights: ``W <- W_hat + (alpha/r) * (a @ b).T`` per targeted linear.

    QuantizedTensor weights are dequantized first, so targeted linears come back dense
    (in the weight's dtype); everything else is returned unchanged (shared, not copied).
    """
    scale = lora_scale(config)
    layers = _layers(params)
    if len(lora["layers"]) != len(layers):
        raise ValueError(f"LoRA has {len(lora['layers'])} layers, params have {len(layers)}")
    new_layers = []
    for i, (layer, lo) in enumerate(zip(layers, lora["layers"])):
        new = dict(layer)
        for name, ab in lo.items():
            if name not in layer:
                raise ValueError(f"LoRA targets layers.{i}.{name}, which params do not have")
            w = layer[name]
            dense = dequantize(w) if isinstance(w, QuantizedTensor) else w
            new[name] = (dense.astype(jnp.float32) + lora_delta(ab, scale)).astype(dense.dtype)
        new_layers.append(new)
    out = dict(params)
    out["layers"] = new_layers
    return out


def num_lora_params(lora: Mapping[str, Any]) -> int:
    """Total number of trainable LoRA values."""
    return sum(int(x.size) for x in jax.tree.leaves(lora))
