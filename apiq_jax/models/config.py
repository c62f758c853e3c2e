"""Model configuration: a frozen, hashable dataclass built from a Hugging Face config.

The dataclass is a static argument of ``jax.jit``: every field is a Python scalar, string
or tuple. It carries exactly what the math needs (sizes, RoPE, norms, biases, attention
windows) plus the few token ids and limits needed to write a loadable ``config.json``
back out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# HF architecture name -> HF model_type
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES: dict[str, str] = {v: k for k, v in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "swish")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a Llama-family decoder (Llama 1/2/3, Mistral, Qwen2).

    Attributes:
      architecture: HF architecture name ("LlamaForCausalLM", "MistralForCausalLM",
        "Qwen2ForCausalLM").
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes.
      num_attention_heads, num_key_value_heads, head_dim: attention geometry
        (grouped-query attention when ``num_key_value_heads < num_attention_heads``).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_type: "default", "linear" (positions divided by ``rope_factor``) or "llama3"
        (Llama 3.1 frequency-dependent scaling).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor,
        rope_original_max_position_embeddings: RoPE scaling parameters (unused for
        "default").
      tie_word_embeddings: the output head reuses ``embed_tokens``.
      qkv_bias: q/k/v projections have a bias (Qwen2; Llama with ``attention_bias``).
      o_bias: o_proj has a bias (Llama with ``attention_bias``).
      mlp_bias: gate/up/down projections have a bias (Llama ``mlp_bias``).
      sliding_window: attention window in tokens for "sliding_attention" layers, or None.
      layer_types: per-layer "full_attention" / "sliding_attention".
      max_position_embeddings, bos_token_id, eos_token_id, pad_token_id: copied through
        to the written ``config.json``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; accepted: {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; accepted: {ROPE_TYPES}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or any(
                t not in LAYER_TYPES for t in self.layer_types
            ):
                raise ValueError(
                    f"layer_types={self.layer_types!r} must hold {self.num_hidden_layers} entries "
                    f"from {LAYER_TYPES}"
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive int or None")

    # --- derived -------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        """HF ``model_type`` ("llama", "mistral" or "qwen2")."""
        return ARCHITECTURES[self.architecture]

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def attention_window(self, layer_idx: int | None) -> int | None:
        """Sliding-window size for layer ``layer_idx`` (None means full causal attention).

        When the layers differ, ``layer_idx`` is required; a uniform config ignores it.

        Args:
          layer_idx: the decoder layer's index, or None.

        Returns:
          The window in tokens, or None.

        Raises:
          ValueError: a config that mixes full and sliding-window layers and ``layer_idx``
            None or outside ``[0, num_hidden_layers)``.
        """
        if self.sliding_window is None or self.layer_types is None:
            return None
        kinds = set(self.layer_types)
        if len(kinds) == 1:
            return self.sliding_window if "sliding_attention" in kinds else None
        if layer_idx is None:
            raise ValueError(
                "this model mixes full and sliding-window attention layers "
                f"(layer_types={self.layer_types}); pass layer_idx to block_forward"
            )
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise ValueError(f"layer_idx={layer_idx} out of range [0, {self.num_hidden_layers})")
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def inv_freq(self) -> Any:
        """RoPE inverse frequencies ``[head_dim / 2]`` (float32 numpy), scaling applied.

        Mirrors transformers' ``ROPE_INIT_FUNCTIONS`` for "default", "linear" and "llama3".

        Returns:
          A float32 numpy array ``[head_dim // 2]``.
        """
        import numpy as np

        dim = self.head_dim
        # transformers computes this in torch float32: arange(0, dim, 2) / dim, base ** that
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        if self.rope_type == "linear":
            inv = (inv / np.float32(self.rope_factor)).astype(np.float32)
        elif self.rope_type == "llama3":
            factor = self.rope_factor
            old_len = self.rope_original_max_position_embeddings
            low_wavelen = old_len / self.rope_low_freq_factor
            high_wavelen = old_len / self.rope_high_freq_factor
            wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
            scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
            smooth = ((old_len / wavelen - self.rope_low_freq_factor)
                      / (self.rope_high_freq_factor - self.rope_low_freq_factor)).astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    # --- Hugging Face conversion ---------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Build from a ``transformers`` config object (LlamaConfig, MistralConfig, Qwen2Config).

        Args:
          hf_config: the config object (anything with the same attributes).

        Returns:
          The :class:`ModelConfig`.

        Raises:
          ValueError: architectures, activations and RoPE variants this decoder does not
            implement (partial rotary factors included), naming the value and what is
            accepted; or field values :class:`ModelConfig` rejects.
        """
        archs = list(getattr(hf_config, "architectures", None) or [])
        model_type = getattr(hf_config, "model_type", None)
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            if archs:
                raise ValueError(
                    f"architecture {archs} (model_type={model_type!r}) is not supported; "
                    f"accepted: {sorted(ARCHITECTURES)}"
                )
            if model_type not in MODEL_TYPES:
                raise ValueError(
                    f"model_type={model_type!r} is not supported; accepted: {sorted(MODEL_TYPES)}"
                )
            arch = MODEL_TYPES[model_type]
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; accepted: {ACTIVATIONS}")
        n_heads = int(hf_config.num_attention_heads)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads

        rope = _rope_fields(hf_config)
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif arch == "MistralForCausalLM":
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
            mlp_bias = bool(getattr(hf_config, "mlp_bias", False))

        sliding_window = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None)
        n_layers = int(hf_config.num_hidden_layers)
        if arch == "LlamaForCausalLM":
            sliding_window, layer_types = None, None
        elif sliding_window is not None:
            if layer_types is None:  # Mistral: the window applies to every layer
                layer_types = ["sliding_attention"] * n_layers
        else:
            layer_types = None
        eos = getattr(hf_config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        return cls(
            architecture=arch,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(n_kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=None if sliding_window is None else int(sliding_window),
            layer_types=None if layer_types is None else tuple(layer_types),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=eos,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            **rope,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for the matching ``transformers`` config class.

        Returns:
          A dict of HF field names (``architectures``, the sizes, ``rope_parameters``, the
          token ids, ...) plus the architecture's own bias or sliding-window fields.
        """
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        out: dict[str, Any] = dict(
            architectures=[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.architecture == "LlamaForCausalLM":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.architecture == "MistralForCausalLM":
            out.update(sliding_window=self.sliding_window)
        else:
            out.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types) if self.layer_types is not None else None,
            )
        return out

    def to_hf(self) -> Any:
        """A ``transformers`` config object (LlamaConfig / MistralConfig / Qwen2Config).

        Returns:
          ``AutoConfig.for_model(model_type, **to_hf_dict())``.
        """
        from transformers import AutoConfig

        kwargs = self.to_hf_dict()
        cfg = AutoConfig.for_model(self.model_type, **kwargs)
        if self.architecture == "Qwen2ForCausalLM" and self.sliding_window is not None:
            cfg.sliding_window = self.sliding_window
        return cfg


def _rope_fields(hf_config: Any) -> dict[str, Any]:
    """RoPE fields of :class:`ModelConfig` from a transformers 4.x or 5.x config."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} (rope parameters {params}) is not supported; accepted: {ROPE_TYPES}"
        )
    prf = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={prf!r} is not supported; accepted: 1.0")
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        omax = params.get("original_max_position_embeddings",
                          getattr(hf_config, "max_position_embeddings", 8192))
        out["rope_original_max_position_embeddings"] = int(omax)
    return out
