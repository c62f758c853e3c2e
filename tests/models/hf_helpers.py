"""Tiny random Hugging Face (PyTorch) models for parity tests.

Every parameter is re-drawn (norm weights around 1, biases non-zero) so that a bug in any
of them shows in the logits; transformers' own init would leave biases at zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# name -> (transformers config class name, kwargs); small, with an MLP width that is not a
# multiple of 64 and grouped-query attention everywhere.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )),
    "llama3": ("LlamaConfig", dict(  # Llama 3.1 rope scaling, q/k/v/o and MLP biases, head_dim != D/H
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    )),
    "mistral": ("MistralConfig", dict(  # sliding window shorter than the test sequences
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, sliding_window=8, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "qwen2": ("Qwen2Config", dict(  # q/k/v bias, tied embeddings
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    )),
}


def make_hf_model(kind: str, seed: int = 0) -> Any:
    """A random float32 transformers ``*ForCausalLM`` of the ``TINY[kind]`` config, eval mode."""
    import torch
    import transformers

    cls_name, kwargs = TINY[kind]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_hf_model(kind: str, path: Path, seed: int = 0, **save_kwargs: Any) -> tuple[Any, Path]:
    """Create :func:`make_hf_model` and ``save_pretrained`` it (safetensors) into ``path``."""
    model = make_hf_model(kind, seed)
    model.save_pretrained(str(path), **save_kwargs)
    return model, path


def torch_logits(model: Any, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits of a transformers model as float32 numpy."""
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
        out = model(torch.tensor(np.asarray(ids), dtype=torch.long), **kwargs).logits
    return out.float().numpy()


def random_ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)
