"""The linears of a decoder block in stages, and the input of each stage.

ApiQ-lw and GPTQ (true-sequential) calibrate a block stage by stage; a stage is the
linears that read the same input:

    qkv: q/k/v_proj read norm1(x)            o: o_proj reads the attention before it
    gate_up: gate/up_proj read norm2(x + attn)    down: down_proj reads silu(gate) * up

:func:`stage_input` computes a stage's input with the model's own building blocks
(:mod:`apiq_jax.models.llama`), so every linear is whatever the layer holds (dense,
quantized, or a mix: the earlier stages already quantized) with the LoRA given active.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from apiq_jax.calibration.blocks import sample_groups, split_samples
from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import attention, attention_mask_matrix, linear, rms_norm, rope_cos_sin

__all__ = ["STAGES", "Stage", "stage_input", "stage_inputs"]


class Stage(NamedTuple):
    """Linears that share an input, calibrated together."""

    name: str
    linears: tuple[str, ...]


#: the stages of a decoder block, in the order they are calibrated
STAGES: tuple[Stage, ...] = (
    Stage("qkv", ("q_proj", "k_proj", "v_proj")),
    Stage("o", ("o_proj",)),
    Stage("gate_up", ("gate_proj", "up_proj")),
    Stage("down", ("down_proj",)),
)


def _attention_core(layer, h, config, lora, cos, sin, mask):
    """Attention output *before* o_proj (o_proj replaced by an exact identity, its LoRA dropped)."""
    q_dim = config.num_attention_heads * config.head_dim
    p = {k: v for k, v in layer.items() if k not in ("o_proj", "o_proj_bias")}
    p["o_proj"] = jnp.eye(q_dim, dtype=h.dtype)
    lo = None if lora is None else lora.replace({k: v for k, v in lora.factors.items() if k != "o_proj"})
    return attention(p, h, config, cos=cos, sin=sin, mask=mask, lora=lo)


def stage_input(
    layer: Mapping[str, Any],
    x: jnp.ndarray,
    config: ModelConfig,
    stage: int,
    lora: Lora | None = None,
    layer_idx: int | None = None,
) -> jnp.ndarray:
    """Input of the linears of ``STAGES[stage]`` when the block runs on ``x``.

    Args:
      layer: the layer's dict (linears dense or QuantizedTensor).
      x: block input ``[b, s, D]``.
      config: the model config.
      stage: index into :data:`STAGES`.
      lora: the layer's :class:`~apiq_jax.lora.Lora` (the linears before the stage use it),
        or None.
      layer_idx: see :func:`apiq_jax.models.llama.block_forward`.

    Returns:
      ``[b, s, in]``: 0: ``norm1(x)``; 1: the attention before o_proj; 2:
      ``norm2(x + attn)``; 3: ``silu(gate(.)) * up(.)``.
    """
    b, s, _ = x.shape
    eps = config.rms_norm_eps
    h = rms_norm(x, layer["input_layernorm"], eps)
    if stage == 0:
        return h
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    cos, sin = rope_cos_sin(pos, config, x.dtype)
    mask = attention_mask_matrix(s, None, config.attention_window(layer_idx))
    core = _attention_core(layer, h, config, lora, cos, sin, mask)
    if stage == 1:
        return core
    lo = {} if lora is None else lora
    attn = linear(core, layer["o_proj"], lo.get("o_proj"), bias=layer.get("o_proj_bias"))
    m = rms_norm(x + attn, layer["post_attention_layernorm"], eps)
    if stage == 2:
        return m
    gate = linear(m, layer["gate_proj"], lo.get("gate_proj"), bias=layer.get("gate_proj_bias"))
    up = linear(m, layer["up_proj"], lo.get("up_proj"), bias=layer.get("up_proj_bias"))
    return jax.nn.silu(gate) * up


def _stage_inputs(layer, xs, config, stage, lora, layer_idx):
    def one(x):  # computed in float32 (as calibration trains), stored back in the cache dtype
        return stage_input(layer, x[None].astype(jnp.float32), config, stage, lora, layer_idx)[0].astype(xs.dtype)

    return jax.lax.map(one, xs)


@partial(jax.jit, static_argnames=("config", "stage", "layer_idx", "groups", "axes"))
def _stage_inputs_jit(layer, xs, config, stage, lora=None, layer_idx=None, groups=1, axes=None):
    if groups == 1:
        return _stage_inputs(layer, xs, config, stage, lora, layer_idx)
    out = split_samples(lambda x: _stage_inputs(layer, x, config, stage, lora, layer_idx), xs, groups=groups,
                        axes=axes)  # [groups, n / groups, s, in]
    return out.reshape(xs.shape[0], *out.shape[2:])


def stage_inputs(layer: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, stage: int, lora: Lora | None = None,
                 layer_idx: int | None = None) -> jnp.ndarray:
    """:func:`stage_input` of every sample of ``xs [n, s, D]`` (batch 1 each, one program).

    Under :func:`jax.set_mesh`, a cache split over the devices by samples is computed as one
    sample loop per device (as :func:`~apiq_jax.calibration.blocks.run_block`) and the result
    is split the same way.

    Args:
      layer, config, stage, lora, layer_idx: see :func:`stage_input`.
      xs: block inputs ``[n, s, D]`` (any float dtype; each sample is computed in float32).

    Returns:
      ``[n, s, in]`` in ``xs``'s dtype.
    """
    groups, axes = sample_groups(xs)
    return _stage_inputs_jit(layer, xs, config, stage, lora, layer_idx=layer_idx, groups=groups, axes=axes)
