"""One decoder block at a time: embeddings, running a block over the calibration set, freezing.

* :func:`embed_ids` / :func:`run_block`: the start of every activation stream and one block
  applied to all samples (batch 1 each, one compiled program for same-shaped blocks).
* :func:`freeze_layer`: the one route from a layer's dense linears to QuantizedTensor leaves
  (:func:`apiq_jax.quant.quantize`, with learned :class:`~apiq_jax.quant.ClipLogits` where
  given). Every method quantizes each linear exactly once through it (GPTQ, which picks its
  own codes, through :func:`apiq_jax.quant.from_codes`).
* :func:`fake_quant_layer`: the differentiable counterpart used while training.
* :func:`float32_view`: a frozen layer as the float32 computations see it (no re-quantizing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.lora import LINEARS, Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward, embed
from apiq_jax.models.quantized import quantize_weight
from apiq_jax.quant import ClipLogits, QuantConfig, QuantizedTensor, fake_quantize

__all__ = ["as_float32", "embed_ids", "fake_quant_layer", "float32_view", "freeze_layer", "layer_idx_arg",
           "run_block"]


@partial(jax.jit, static_argnames=("config",))
def _embed_jit(params: Mapping[str, Any], ids: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    return embed(params, ids, config)


def embed_ids(params: Mapping[str, Any], ids: Any, config: ModelConfig) -> jnp.ndarray:
    """Embeddings of the calibration ids (the start of every stream).

    Args:
      params: model params (only ``embed_tokens`` is read).
      ids: int ids ``[n, seqlen]``.
      config: the model config.

    Returns:
      ``[n, seqlen, D]`` in the embedding's dtype.
    """
    return _embed_jit({"embed_tokens": params["embed_tokens"]}, jnp.asarray(ids, jnp.int32), config)


@partial(jax.jit, static_argnames=("config", "layer_idx"))
def run_block(layer_params: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, lora: Lora | None = None,
              layer_idx: int | None = None) -> jnp.ndarray:
    """Apply one decoder block to every sample of ``xs`` (batch 1 each, one program).

    Args:
      layer_params: the layer's dict (linears dense or QuantizedTensor).
      xs: block inputs ``[n, seqlen, D]``.
      config: the model config (static).
      lora: that layer's :class:`~apiq_jax.lora.Lora`, or None.
      layer_idx: the layer index where the config mixes attention kinds (static), else None.

    Returns:
      The block outputs ``[n, seqlen, D]``.
    """

    def one(x: jnp.ndarray) -> jnp.ndarray:
        return block_forward(layer_params, x[None], config, lora=lora, layer_idx=layer_idx)[0]

    return jax.lax.map(one, xs)


def layer_idx_arg(config: ModelConfig, i: int) -> int | None:
    """The ``layer_idx`` to pass for block ``i``: only where the config mixes attention kinds.

    Uniform configs ignore the index, so passing None keeps one compiled program for all blocks.

    Args:
      config: the model config.
      i: the block index.

    Returns:
      ``i`` or None.
    """
    if config.layer_types is not None and len(set(config.layer_types)) > 1:
        return i
    return None


def as_float32(layer: Mapping[str, Any]) -> dict[str, Any]:
    """Every array of a dense layer cast to float32 (the precision calibration trains in).

    Args:
      layer: a layer's dict of arrays.

    Returns:
      A new dict with float32 arrays.
    """
    return {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}


def float32_view(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A (partly) frozen layer as float32 computations see it.

    QuantizedTensors keep their codes and constants and dequantize to float32; dense arrays
    are cast. Nothing is quantized again.

    Args:
      layer: a layer's dict (dense arrays and QuantizedTensors).

    Returns:
      A new dict.
    """
    return {
        k: dataclasses.replace(v, dtype="float32") if isinstance(v, QuantizedTensor) else jnp.asarray(v, jnp.float32)
        for k, v in layer.items()
    }


def freeze_layer(
    layer: Mapping[str, Any],
    quant_config: QuantConfig,
    clips: Mapping[str, ClipLogits] | None = None,
    targets: Sequence[str] = LINEARS,
    *,
    where: str = "layer",
) -> dict[str, Any]:
    """One layer with its ``targets`` quantized by :func:`apiq_jax.quant.quantize` (compiled once per shape).

    Args:
      layer: the layer's dict; targets that are already QuantizedTensors stay as they are.
      quant_config: the quantizer.
      clips: learned clipping logits per linear name; missing names are plain RTN.
      targets: the linears to quantize.
      where: how errors name the layer (e.g. ``"layers.3"``).

    Returns:
      A new dict (other entries shared).

    Raises:
      ValueError: a non-finite weight, naming ``where`` and the linear.
    """
    clips = clips or {}
    out = dict(layer)
    for name in targets:
        w = layer[name]
        if isinstance(w, QuantizedTensor):
            continue
        out[name] = quantize_weight(w, quant_config, clips.get(name), name=f"{where}.{name}")
    return out


def fake_quant_layer(
    layer: Mapping[str, Any], clips: Mapping[str, ClipLogits], quant_config: QuantConfig
) -> dict[str, Any]:
    """The layer with every linear in ``clips`` fake-quantized (differentiable in the logits).

    Args:
      layer: the layer's dict with dense linears.
      clips: clipping logits per linear name.
      quant_config: the quantizer.

    Returns:
      A new dict (other entries shared).
    """
    out = dict(layer)
    for name, clip in clips.items():
        out[name] = fake_quantize(layer[name], quant_config, clip=clip)
    return out
