"""Test helpers shared by the interop and generation tests."""

from __future__ import annotations

import json

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


def copy_without_weights(src, dst):
    """A copy of the directory ``src`` at ``dst`` without its ``model.safetensors``."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return dst


def shard_gptq_dir(src, dst, n=3):
    """``src``'s ``model.safetensors`` as ``n`` Hugging Face shards + ``model.safetensors.index.json`` in ``dst``.

    Keys are dealt round-robin, so one linear's qweight, qzeros, scales and g_idx land in different shards.
    """
    from safetensors.numpy import load_file, save_file

    copy_without_weights(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    keys = sorted(tensors)
    weight_map = {k: names[i % n] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: tensors[k] for k in keys if weight_map[k] == name}, str(dst / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst, names
