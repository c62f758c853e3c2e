"""LoRA parameters as a pytree kept separate from the frozen (quantized) weights.

A :class:`Lora` is a registered dataclass pytree: its ``factors`` (the children) mirror the
model params, ``{"layers": [{"q_proj": {"a": [in, r], "b": [r, out]}, ...}, ...]}``, one
entry per targeted linear, and its :class:`LoraConfig` (rank, alpha, targets) is static
metadata, so the tree carries its own scale ``alpha / r``. A targeted linear computes
``y = x @ W.T + lora.scale * (x @ a) @ b`` (``W`` in PyTorch ``[out, in]`` layout), so the
dense equivalent is ``W + lora.scale * (a @ b).T``. Indexing a ``Lora`` gives the
sub-tree as a ``Lora`` with the same config (``lora["layers"][3]["q_proj"]``), down to the
arrays themselves (``lora["layers"][3]["q_proj"]["a"]``).

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

#: The attention linears of a decoder block, in the order the block applies them.
ATTN_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
#: The MLP linears of a decoder block.
MLP_LINEARS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
#: The seven linears of a decoder block: what LoRA can target and calibration quantizes.
LINEARS: tuple[str, ...] = ATTN_LINEARS + MLP_LINEARS

_ALIASES = {t.split("_")[0]: t for t in LINEARS}  # "q" -> "q_proj", "gate" -> "gate_proj"
INIT_METHODS = ("qlora", "zeros")



def normalize_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical target names from names or short aliases ("q", "gate", ...) or "all".

    Accepts a comma-separated string too.

    Args:
      targets: names or aliases (``("q_proj", "v")``), ``"all"``, or one string such as
        ``"q,k,v"``.

    Returns:
      The canonical names in :data:`LINEARS` order, without duplicates.

    Raises:
      ValueError: an unknown entry (named in the message), or no entry at all.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        if t == "all":
            out.extend(LINEARS)
            continue
        name = _ALIASES.get(t, t)
        if name not in LINEARS:
            raise ValueError(
                f"unknown LoRA/quantization target {t!r}; accepted: {LINEARS} "
                f"(or the short forms {tuple(_ALIASES)}, or 'all')"
            )
        out.append(name)
    if not out:
        raise ValueError(f"targets must name at least one linear; accepted: {LINEARS}")
    return tuple(t for t in LINEARS if t in set(out))  # canonical order, no duplicates


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
    targets: tuple[str, ...] = LINEARS

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
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form.

        Returns:
          ``{"rank": int, "alpha": float, "targets": [str, ...]}``.
        """
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Inverse of :meth:`to_dict`.

        Args:
          d: a mapping with ``"rank"``, ``"alpha"`` and ``"targets"``.

        Returns:
          The :class:`LoraConfig`.

        Raises:
          KeyError: a missing field.
          ValueError: an invalid rank, alpha or target.
        """
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lora:
    """LoRA factors with their config: a pytree whose leaves are the factors only.

    Attributes:
      factors: the factor arrays (children): ``{"layers": [{name: {"a": [in, r],
        "b": [r, out]}}]}`` for a model, ``{name: {"a", "b"}}`` for one layer or
        ``{"a", "b"}`` for one linear.
      config: the :class:`LoraConfig` (static metadata: rank, alpha, targets).

    Example:
      >>> import jax.numpy as jnp
      >>> lora = Lora({"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}, LoraConfig(rank=2, alpha=4.0))
      >>> lora.scale, lora.a.shape, lora.b.shape
      (2.0, (4, 2), (2, 3))
    """

    factors: Any
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """r, the inner dimension of the factors."""
        return self.config.rank

    @property
    def alpha(self) -> float:
        """The scaling numerator."""
        return self.config.alpha

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of the LoRA term."""
        return self.config.scale

    @property
    def a(self) -> jnp.ndarray:
        """``a [in, r]`` of a one-linear ``Lora``."""
        return self.factors["a"]

    @property
    def b(self) -> jnp.ndarray:
        """``b [r, out]`` of a one-linear ``Lora``."""
        return self.factors["b"]

    @property
    def layers(self) -> list["Lora"]:
        """One ``Lora`` per decoder layer of a model-level tree (stacked layers are sliced)."""
        return [Lora(layer, self.config) for layer in self.unstack_layers().factors["layers"]]

    @property
    def is_stacked(self) -> bool:
        """Whether ``factors["layers"]`` is one dict of stacked factors (:meth:`stack_layers`)."""
        return isinstance(self.factors, Mapping) and isinstance(self.factors.get("layers"), Mapping)

    def stack_layers(self) -> "Lora":
        """The model-level factors with the ``"layers"`` list stacked along a leading layer axis.

        ``{"layers": [{name: {"a": [in, r], "b": [r, out]}}] * L}`` becomes
        ``{"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}}``, the form
        :func:`apiq_jax.models.forward` scans over (with params from
        :func:`apiq_jax.models.stack_layers`). A stacked ``Lora`` is returned as is.

        Returns:
          A ``Lora`` with the same config and stacked factors.

        Raises:
          ValueError: no ``"layers"`` entry, no layers, or layers that target different
            linears or have differently shaped factors.

        Example:
          >>> import jax.numpy as jnp
          >>> lo = Lora({"layers": [{"q_proj": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}}] * 3},
          ...           LoraConfig(rank=2))
          >>> st = lo.stack_layers()
          >>> st.is_stacked, st["layers"]["q_proj"].a.shape, st.unstack_layers()["layers"][2]["q_proj"].a.shape
          (True, (3, 4, 2), (4, 2))
        """
        if self.is_stacked:
            return self
        if not isinstance(self.factors, Mapping) or "layers" not in self.factors:
            raise ValueError("stack_layers needs a model-level Lora (factors with a 'layers' list)")
        layers = list(self.factors["layers"])
        if not layers:
            raise ValueError("stack_layers: the Lora has no layers")
        first = jax.tree.structure(layers[0])
        shapes0 = [jnp.shape(x) for x in jax.tree.leaves(layers[0])]
        for i, layer in enumerate(layers[1:], start=1):
            if jax.tree.structure(layer) != first or [jnp.shape(x) for x in jax.tree.leaves(layer)] != shapes0:
                raise ValueError(f"stack_layers: LoRA layer {i} differs from layer 0 in targets or factor shapes")
        factors = dict(self.factors)
        factors["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return Lora(factors, self.config)

    def unstack_layers(self) -> "Lora":
        """Inverse of :meth:`stack_layers` (a ``Lora`` with a ``"layers"`` list is returned as is).

        Returns:
          A ``Lora`` with the same config whose ``factors["layers"]`` is a list of per-layer dicts.
        """
        if not self.is_stacked:
            return self
        stacked = self.factors["layers"]
        leaves = jax.tree.leaves(stacked)
        n = int(leaves[0].shape[0]) if leaves else 0
        factors = dict(self.factors)
        factors["layers"] = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
        return Lora(factors, self.config)

    def __getitem__(self, key: Any) -> Any:
        """Sub-tree ``factors[key]``: a ``Lora`` (same config) for a container, the array itself for a leaf."""
        sub = self.factors[key]
        return Lora(sub, self.config) if isinstance(sub, (Mapping, list, tuple)) else sub

    def get(self, key: Any, default: Any = None) -> Any:
        """``self[key]`` when present, else ``default``.

        Args:
          key: a key or list index of ``factors``.
          default: the value returned when ``key`` is absent.

        Returns:
          A sub-tree ``Lora`` (same config), an array for a leaf, or ``default``.
        """
        try:
            return self[key]
        except (KeyError, IndexError, TypeError):
            return default

    def __contains__(self, key: Any) -> bool:
        return isinstance(self.factors, Mapping) and key in self.factors

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self) -> Any:
        """Keys of a mapping-level ``factors``; sub-trees (as ``Lora``) of a list-level one."""
        if isinstance(self.factors, Mapping):
            return iter(self.factors)
        return (self[i] for i in range(len(self.factors)))

    def keys(self) -> Any:
        """Keys of a mapping-level ``factors``.

        Returns:
          ``factors.keys()`` (e.g. the targeted linears of a one-layer ``Lora``).
        """
        return self.factors.keys()

    def items(self) -> list[tuple[Any, Any]]:
        """``(key, self[key])`` pairs of a mapping-level ``factors``.

        Returns:
          A list of ``(key, sub-tree)`` pairs (a ``Lora`` for a container, an array for a leaf).
        """
        return [(k, self[k]) for k in self.factors]

    def replace(self, factors: Any) -> "Lora":
        """The same config with other factors.

        Args:
          factors: the new factor tree.

        Returns:
          ``Lora(factors, self.config)``.
        """
        return Lora(factors, self.config)

    def astype(self, dtype: Any) -> "Lora":
        """Every factor cast to ``dtype``.

        Args:
          dtype: the target dtype.

        Returns:
          A new ``Lora`` with the same config.
        """
        return self.replace(jax.tree.map(lambda x: jnp.asarray(x, dtype), self.factors))


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
) -> Lora:
    """Fresh LoRA factors for every targeted linear of ``params``.

    ``method="qlora"``: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` (what peft's
    ``kaiming_uniform_(a=sqrt(5))`` gives) and ``b = 0``, so the model output is unchanged.
    ``method="zeros"``: both zero (placeholders to be overwritten).
    Linear leaves may be dense or QuantizedTensor (only the shape is used).

    Args:
      params: the model params (``params["layers"][i][name]`` is a 2-D ``[out, in]`` weight).
      config: rank, alpha and targets.
      key: a jax PRNG key (split per linear).
      method: "qlora" or "zeros".
      dtype: dtype of the factors.

    Returns:
      A :class:`Lora` over ``config.targets`` of every layer.

    Raises:
      ValueError: an unknown ``method``, params without a ``"layers"`` list, a layer
        without a targeted linear, or a weight that is not 2-D.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"layers": [{"q_proj": jnp.zeros((8, 16))}]}
      >>> lora = init_lora(params, LoraConfig(rank=4, alpha=8.0, targets=("q",)), jax.random.key(0))
      >>> lora["layers"][0]["q_proj"].a.shape, lora.scale
      ((16, 4), 2.0)
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method={method!r} is not supported; accepted: {INIT_METHODS}")
    layers = _layers(params)
    return Lora({"layers": [init_lora_layer(params, config, key, i, method=method, dtype=dtype).factors
                            for i in range(len(layers))]}, config)


def init_lora_layer(
    params: Mapping[str, Any],
    config: LoraConfig,
    key: jax.Array,
    i: int,
    *,
    method: str = "qlora",
    dtype: Any = jnp.float32,
) -> Lora:
    """Layer ``i`` of :func:`init_lora` (bit for bit), without making the other layers.

    A calibration that walks the blocks one at a time starts each block from this, so the
    initial LoRA of the whole model is never held at once.

    Args:
      params: the model params (only the shapes of ``params["layers"][i]`` are read).
      config: rank, alpha and targets.
      key: the key :func:`init_lora` would be given.
      i: the layer index.
      method: "qlora" or "zeros".
      dtype: dtype of the factors.

    Returns:
      A layer-level :class:`Lora` (``{linear: {"a", "b"}}``).

    Raises:
      ValueError: as :func:`init_lora`, or ``i`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"layers": [{"q_proj": jnp.zeros((8, 16))}, {"q_proj": jnp.zeros((8, 16))}]}
      >>> cfg, key = LoraConfig(rank=4, targets=("q",)), jax.random.key(0)
      >>> bool((init_lora_layer(params, cfg, key, 1)["q_proj"].a == init_lora(params, cfg, key)["layers"][1]["q_proj"].a).all())
      True
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method={method!r} is not supported; accepted: {INIT_METHODS}")
    layers = _layers(params)
    if not 0 <= i < len(layers):
        raise ValueError(f"layer index {i} is out of range; accepted: 0 <= i < {len(layers)}")
    n_targets = len(config.targets)
    keys = jax.random.split(key, max(1, len(layers) * n_targets))
    layer = layers[i]
    entry = {}
    for j, name in enumerate(config.targets):
        if name not in layer:
            raise ValueError(f"layer {i} has no linear {name!r} (targets={config.targets})")
        out_f, in_f = _weight_shape(layer[name], f"layers.{i}.{name}")
        if method == "qlora":
            a = _kaiming_uniform(keys[i * n_targets + j], in_f, config.rank).astype(dtype)
        else:
            a = jnp.zeros((in_f, config.rank), dtype)
        entry[name] = {"a": a, "b": jnp.zeros((config.rank, out_f), dtype)}
    return Lora(entry, config)


def lora_from_factors(
    params: Mapping[str, Any],
    config: LoraConfig,
    factors: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
) -> Lora:
    """A :class:`Lora` from given factors, validated against ``params`` and ``config``.

    ``factors`` is either a :class:`Lora`, a nested tree (``{"layers": [{name: {"a", "b"}}]}``) or a flat
    mapping ``{"layers.<i>.<name>": (a, b)}`` / ``{"layers.<i>.<name>": {"a", "b"}}``.
    Each ``a`` must be ``[in, rank]`` and ``b`` ``[rank, out]`` for that linear; every
    targeted linear must be given.

    Args:
      params: the model params (``params["layers"][i][name]`` is a 2-D ``[out, in]`` weight).
      config: rank, alpha and targets.
      factors: the factors, in one of the forms above.
      dtype: dtype of the returned factors.

    Returns:
      A :class:`Lora` over ``config.targets`` of every layer.

    Raises:
      ValueError: missing or unexpected entries, a factor of the wrong shape (the
        message names the bad entry), params without a ``"layers"`` list, or a weight
        that is not 2-D.
    """
    layers = _layers(params)
    if isinstance(factors, Lora):
        factors = factors.factors
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
            if name not in layer:
                raise ValueError(f"layer {i} has no linear {name!r} (targets={config.targets})")
            out_f, in_f = _weight_shape(layer[name], key)
            if tuple(a.shape) != (in_f, config.rank) or tuple(b.shape) != (config.rank, out_f):
                raise ValueError(
                    f"{key}: got a {tuple(a.shape)}, b {tuple(b.shape)}; expected a {(in_f, config.rank)} "
                    f"and b {(config.rank, out_f)} (rank {config.rank}, weight [out={out_f}, in={in_f}])"
                )
            entry[name] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
        out_layers.append(entry)
    return Lora({"layers": out_layers}, config)


def lora_delta(lora: Lora) -> jnp.ndarray:
    """Dense ``[out, in]`` update ``lora.scale * (a @ b).T`` of a one-linear :class:`Lora`.

    Args:
      lora: a one-linear ``Lora`` (``a [in, r]``, ``b [r, out]``).

    Returns:
      The update ``[out, in]``, float32.
    """
    a = lora.a.astype(jnp.float32)
    b = lora.b.astype(jnp.float32)
    return lora.scale * (a @ b).T


def merge_lora(params: Mapping[str, Any], lora: Lora) -> dict[str, Any]:
    """Fold LoRA into dense weights: ``W <- W_hat + (alpha/r) * (a @ b).T`` per targeted linear.

    QuantizedTensor weights are dequantized first, so targeted linears come back dense
    (in the weight's dtype); everything else is returned unchanged (shared, not copied).

    Args:
      params: the model params (dense or frozen).
      lora: the model's :class:`Lora`.

    Returns:
      The params with every targeted linear dense and merged.

    Raises:
      ValueError: ``lora`` is not a :class:`Lora`, its layer count differs from the
        params', or it targets a linear the params do not have.
    """
    if not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora, got {type(lora).__name__}")
    layers = _layers(params)
    if len(lora.layers) != len(layers):
        raise ValueError(f"LoRA has {len(lora.layers)} layers, params have {len(layers)}")
    new_layers = []
    for i, (layer, lo) in enumerate(zip(layers, lora.layers)):
        new = dict(layer)
        for name, ab in lo.items():
            if name not in layer:
                raise ValueError(f"LoRA targets layers.{i}.{name}, which params do not have")
            w = layer[name]
            dense = dequantize(w) if isinstance(w, QuantizedTensor) else w
            new[name] = (dense.astype(jnp.float32) + lora_delta(ab)).astype(dense.dtype)
        new_layers.append(new)
    out = dict(params)
    out["layers"] = new_layers
    return out


def num_lora_params(lora: Lora) -> int:
    """Total number of trainable LoRA values.

    Args:
      lora: a :class:`Lora` (or any pytree of factors).

    Returns:
      The number of scalars over all its leaves.
    """
    return sum(int(x.size) for x in jax.tree.leaves(lora))
