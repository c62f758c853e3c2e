"""A float64 numpy Llama decoder block, written from the model's definition (HF Llama), for
independent references: nothing here calls apiq_jax.

A layer is a dict of float64 arrays: ``input_layernorm``, ``post_attention_layernorm``, the
seven ``[out, in]`` linears and optional ``<name>_bias``; ``lora`` maps a linear name to its
``(a [in, r], b [r, out])`` and is applied as ``scale * (x @ a) @ b``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STAGE_LINEARS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def linear(x: np.ndarray, layer: dict, name: str, lora: dict | None, scale: float) -> np.ndarray:
    y = x @ layer[name].T
    if f"{name}_bias" in layer:
        y = y + layer[f"{name}_bias"]
    if lora is not None and name in lora:
        a, b = lora[name]
        y = y + scale * (x @ a) @ b
    return y


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE of ``x [s, heads, hd]`` at positions 0..s-1."""
    s, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    freqs = np.arange(s)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def attention_core(h: np.ndarray, layer: dict, cfg: Any, lora: dict | None, scale: float) -> np.ndarray:
    """Causal grouped-query attention of ``h [s, D]`` before o_proj: ``[s, heads * hd]``."""
    s = h.shape[0]
    nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = rope(linear(h, layer, "q_proj", lora, scale).reshape(s, nh, hd), cfg.rope_theta)
    k = rope(linear(h, layer, "k_proj", lora, scale).reshape(s, kvh, hd), cfg.rope_theta)
    v = linear(h, layer, "v_proj", lora, scale).reshape(s, kvh, hd)
    out = np.zeros((s, nh, hd))
    causal = np.tril(np.ones((s, s), bool))
    for head in range(nh):
        kv = head // (nh // kvh)
        scores = np.where(causal, q[:, head] @ k[:, kv].T / np.sqrt(hd), -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, head] = (p / p.sum(axis=-1, keepdims=True)) @ v[:, kv]
    return out.reshape(s, nh * hd)


def mlp_hidden(m: np.ndarray, layer: dict, lora: dict | None, scale: float) -> np.ndarray:
    """SwiGLU hidden state ``silu(gate(m)) * up(m)``."""
    gate = linear(m, layer, "gate_proj", lora, scale)
    return gate / (1.0 + np.exp(-gate)) * linear(m, layer, "up_proj", lora, scale)


def stage_input(x: np.ndarray, layer: dict, cfg: Any, stage: int, lora: dict | None, scale: float) -> np.ndarray:
    """Input of the linears of stage ``stage`` (0 qkv, 1 o, 2 gate/up, 3 down) for one sample ``x [s, D]``."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, layer["input_layernorm"], eps)
    if stage == 0:
        return h
    core = attention_core(h, layer, cfg, lora, scale)
    if stage == 1:
        return core
    m = rms_norm(x + linear(core, layer, "o_proj", lora, scale), layer["post_attention_layernorm"], eps)
    return m if stage == 2 else mlp_hidden(m, layer, lora, scale)


def block(x: np.ndarray, layer: dict, cfg: Any, lora: dict | None, scale: float) -> np.ndarray:
    """The decoder block on one sample ``x [s, D]``: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``."""
    eps = cfg.rms_norm_eps
    x = x + linear(attention_core(rms_norm(x, layer["input_layernorm"], eps), layer, cfg, lora, scale), layer,
                   "o_proj", lora, scale)
    m = rms_norm(x, layer["post_attention_layernorm"], eps)
    return x + linear(mlp_hidden(m, layer, lora, scale), layer, "down_proj", lora, scale)
