"""Bottleneck adapters (Houlsby et al., 2019; the Pfeiffer placement) on a frozen model.

One adapter per decoder block, applied to the block's output as a residual bottleneck::

    x <- x + up(gelu(down(x)))        down: [D, r], up: [r, D]

with ``up`` zero-initialised so the adapted model starts as the frozen one. Adapters are a
pytree of their own (``{"layers": [{"down", "down_bias", "up", "up_bias"}, ...]}``), kept
apart from the frozen (quantized) weights, and compose with LoRA. Train them with
:func:`apiq_jax.training.finetune` and ``loss_fn=adapter_loss_fn(config)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward, embed, final_logits
from apiq_jax.training import forward_loss_fn

Adapters = dict[str, list[dict[str, jnp.ndarray]]]


def init_adapters(config: ModelConfig, bottleneck: int, *, key: jax.Array, std: float = 1e-3) -> Adapters:
    """Adapters for every block: ``down ~ N(0, std^2)``, ``up = 0`` (identity at init), float32.

    Args:
      config: the model config (its ``hidden_size`` D and ``num_hidden_layers``).
      bottleneck: r, the inner width of every adapter.
      key: a jax PRNG key (split per block).
      std: standard deviation of the ``down`` initialisation.

    Returns:
      ``{"layers": [{"down": [D, r], "down_bias": [r], "up": [r, D], "up_bias": [D]}, ...]}``,
      one entry per decoder block, all float32 (biases zero).

    Raises:
      ValueError: ``bottleneck`` is not a positive int.
    """
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck!r} must be a positive int")
    d = config.hidden_size
    keys = jax.random.split(key, config.num_hidden_layers)
    return {"layers": [
        {"down": std * jax.random.normal(k, (d, bottleneck), jnp.float32),
         "down_bias": jnp.zeros((bottleneck,), jnp.float32),
         "up": jnp.zeros((bottleneck, d), jnp.float32),
         "up_bias": jnp.zeros((d,), jnp.float32)}
        for k in keys
    ]}


def apply_adapter(adapter: Mapping[str, jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
    """``x + up(gelu(down(x)))`` for hidden states ``x [..., D]`` (computed in float32).

    Args:
      adapter: one block's adapter ``{"down": [D, r], "down_bias": [r], "up": [r, D], "up_bias": [D]}``.
      x: hidden states ``[..., D]``.

    Returns:
      The adapted hidden states, with ``x``'s shape and dtype.
    """
    h = x.astype(jnp.float32)
    z = jax.nn.gelu(h @ adapter["down"] + adapter["down_bias"])
    return (h + z @ adapter["up"] + adapter["up_bias"]).astype(x.dtype)


def adapter_forward(
    params: Mapping[str, Any],
    adapters: Adapters,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    lora: Lora | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` of ``ids [b, s]`` with an adapter after every decoder block.

    Args:
      params: the frozen model params (dense or QuantizedTensor linears).
      adapters: the adapters of :func:`init_adapters`, one per decoder block.
      ids: int token ids ``[b, s]``.
      config: the model config.
      lora: the model's :class:`~apiq_jax.lora.Lora`, active in the linears, or None.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      Logits ``[b, s, V]`` in the embedding's dtype.

    Raises:
      ValueError: ``adapters`` does not hold one entry per decoder block.
    """
    if len(adapters.get("layers", [])) != config.num_hidden_layers:
        raise ValueError(
            f"adapters hold {len(adapters.get('layers', []))} layers; the model has {config.num_hidden_layers}"
        )
    x = embed(params, ids, config)
    for i, layer in enumerate(params["layers"]):
        lo = None if lora is None else lora["layers"][i]
        x = block_forward(layer, x, config, lora=lo, layer_idx=i, backend=backend)
        x = apply_adapter(adapters["layers"][i], x)
    return final_logits(params, x, config, backend=backend)


def adapter_loss_fn(
    config: ModelConfig, *, lora: Lora | None = None, backend: str | None = None
) -> Callable[[Mapping[str, Any], Adapters, jnp.ndarray], jnp.ndarray]:
    """``loss(frozen, adapters, ids)``: mean next-token NLL with the adapters active.

    Args:
      config: the model config.
      lora: a :class:`~apiq_jax.lora.Lora` applied in the forward but not trained (it is
        a constant of the loss), or None.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      ``loss(frozen, adapters, ids)`` returning a float32 scalar, for
      ``finetune(..., loss_fn=...)``; gradients are stopped at ``frozen``.
    """
    return forward_loss_fn(adapter_forward, config, lora=lora, backend=backend)
