"""Load the recorded official ApiQ ``calibrate()`` run (shared/golden/apiq_block.npz) into our layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from apiq_jax.lora import LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_name(i: int, name: str) -> str:
    """HF/peft module path of linear ``name`` in layer ``i``."""
    return f"model.layers.{i}.{'self_attn' if name in ATTN else 'mlp'}.{name}"


def load_golden(npz_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    z = np.load(npz_path)
    meta = json.loads((npz_path.parent / "apiq_block_meta.json").read_text())
    return {k: z[k] for k in z.files}, meta


def golden_model_config(meta: dict[str, Any]) -> ModelConfig:
    c = meta["llama_config"]
    return ModelConfig(
        "LlamaForCausalLM", c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
        c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"],
        rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"],
        max_position_embeddings=c["max_position_embeddings"],
    )


def golden_params(g: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"init/model.layers.{i}."
        layer = {
            "input_layernorm": g[p + "input_layernorm.weight"],
            "post_attention_layernorm": g[p + "post_attention_layernorm.weight"],
        }
        for n in ATTN + MLP:
            layer[n] = g["init/" + module_name(i, n) + ".weight"]
        layers.append(layer)
    return {
        "embed_tokens": g["init/model.embed_tokens.weight"], "layers": layers,
        "norm": g["init/model.norm.weight"], "lm_head": g["init/lm_head.weight"],
    }


def golden_lora(g: dict[str, np.ndarray], cfg: ModelConfig, prefix: str = "lora_init") -> dict[str, Any]:
    """peft A [r, in] / B [out, r] -> our {a: [in, r], b: [r, out]}."""
    return {"layers": [
        {n: {"a": g[f"{prefix}/{module_name(i, n)}/A"].T, "b": g[f"{prefix}/{module_name(i, n)}/B"].T}
         for n in ATTN + MLP}
        for i in range(cfg.num_hidden_layers)
    ]}


def golden_configs(meta: dict[str, Any]) -> tuple[QuantConfig, LoraConfig]:
    wq = meta["weight_quant"]
    qcfg = QuantConfig(wq["n_bits"], wq["group_size"], "sym" if wq["symmetric"] else "asym", scale_dtype="float32")
    lo = meta["lora"]
    return qcfg, LoraConfig(rank=lo["r"], alpha=lo["lora_alpha"], targets=tuple(lo["target_modules"]))


def golden_logits(g: dict[str, np.ndarray], prefix: str, i: int, name: str, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Official (groups, 1) logits -> our [out, n_groups] (gamma = upbound, beta = lowbound)."""
    m = module_name(i, name)
    return g[f"{prefix}/{m}/up_logits"].reshape(out, -1), g[f"{prefix}/{m}/low_logits"].reshape(out, -1)
