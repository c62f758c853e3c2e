"""peft LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) both ways.

peft stores, per targeted linear ``model.layers.<i>.self_attn.q_proj`` (HF naming):
``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``, and applies ``y += (lora_alpha / r) * x A^T B^T``. The
apiq-jax :class:`~apiq_jax.lora.Lora` holds ``a = A^T [in, r]`` and ``b = B^T [r, out]``
with the same ``alpha / r`` scale, so the conversion is a transpose per factor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apiq_jax.lora import Lora, LoraConfig, lora_from_factors
from apiq_jax.models.hf_io import hf_name, read_json
from apiq_jax.models.safetensors_io import write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the prefix peft puts before the base model's own parameter names
PEFT_PREFIX = "base_model.model."


def peft_key(layer: int, name: str, factor: str) -> str:
    """The peft safetensors key of one LoRA factor.

    Args:
      layer: the decoder layer index.
      name: the linear (``"q_proj"`` ... ``"down_proj"``).
      factor: ``"A"`` or ``"B"``.

    Returns:
      e.g. ``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``.
    """
    return PEFT_PREFIX + hf_name(f"layers.{layer}.{name}")[: -len(".weight")] + f".lora_{factor}.weight"


def save_adapter(out_dir: str | os.PathLike, lora: Lora, *, base_model: str | None = None,
                 dtype: Any = np.float32) -> Path:
    """Write ``lora`` as a peft adapter directory.

    Args:
      out_dir: created if needed.
      lora: the model's :class:`~apiq_jax.lora.Lora` (list or stacked layers).
      base_model: ``base_model_name_or_path`` to record (None: left empty).
      dtype: storage dtype of the factors.

    Returns:
      ``out_dir`` as a Path.
    """
    if lora.is_stacked:
        lora = lora.unstack_layers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(lora.factors["layers"]):
        for name, ab in layer.items():
            tensors[peft_key(i, name, "A")] = np.ascontiguousarray(np.asarray(ab["a"], dtype).T)
            tensors[peft_key(i, name, "B")] = np.ascontiguousarray(np.asarray(ab["b"], dtype).T)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    cfg = lora.config
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(cfg.targets), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(adapter_dir: str | os.PathLike, params: Mapping[str, Any]) -> Lora:
    """Read a peft LoRA adapter directory as a :class:`~apiq_jax.lora.Lora` for ``params``.

    Args:
      adapter_dir: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base model params (shapes are checked against it).

    Returns:
      The float32 :class:`~apiq_jax.lora.Lora`.

    Raises:
      FileNotFoundError: a missing directory or file.
      ValueError: a non-LoRA adapter, options apiq-jax does not apply (rslora, DoRA,
        per-module ranks, biases, ``fan_in_fan_out``), missing or misshaped factors.
    """
    d = Path(adapter_dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / f).is_file():
            raise FileNotFoundError(f"adapter file {d / f} not found (a peft adapter needs {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS})")
    cfg = read_json(d / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}; accepted: 'LORA'")
    unsupported = {k: cfg.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out") if cfg.get(k)}
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        unsupported["rank_pattern/alpha_pattern"] = True
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise ValueError(f"{d / ADAPTER_CONFIG}: options {unsupported} are not supported by apiq-jax's LoRA")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{d / ADAPTER_CONFIG}: target_modules {targets!r}; accepted: a list of linear names")
    config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(targets))
    from safetensors.numpy import load_file

    tensors = load_file(str(d / ADAPTER_WEIGHTS))
    factors = {}
    for i in range(len(params["layers"])):
        for name in config.targets:
            ka, kb = peft_key(i, name, "A"), peft_key(i, name, "B")
            if ka not in tensors or kb not in tensors:
                raise ValueError(f"{d / ADAPTER_WEIGHTS}: missing {ka if ka not in tensors else kb}")
            factors[f"layers.{i}.{name}"] = (tensors[ka].astype(np.float32).T, tensors[kb].astype(np.float32).T)
    return lora_from_factors(params, config, factors)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_adapter", "peft_key", "save_adapter"]
