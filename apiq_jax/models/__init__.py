"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2) in Flax NNX, with Hugging Face I/O.

The math lives in the pure functions of :mod:`apiq_jax.models.llama`
(``embed``/``block_forward``/``final_logits``/``forward``); :class:`LlamaForCausalLM` is
the NNX facade. :mod:`~apiq_jax.models.hf_io` reads and writes HF directories,
:mod:`~apiq_jax.models.quantized` builds the ``(frozen, lora)`` pair and
:mod:`~apiq_jax.models.quantized_io` saves it.
"""

from apiq_jax.data import load_tokenizer  # re-exported: models are loaded with their tokenizer
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import (
    copy_tokenizer_files,
    hf_name,
    lazy_params,
    load_config,
    load_hf_config,
    load_params,
    load_pretrained,
    save_pretrained,
)
from apiq_jax.models.llama import (
    LINEARS,
    LlamaForCausalLM,
    QuantizedWeight,
    block_forward,
    block_outputs,
    cast_params,
    check_params,
    embed,
    final_logits,
    flatten_params,
    forward,
    forward_embeddings,
    hidden_states,
    init_params,
    linear,
    param_shapes,
    stack_layers,
    unflatten_params,
    unstack_layers,
    validate_ids,
)
from apiq_jax.models.quantized import (
    apply,
    dequantize_params,
    quantize_model,
    quantize_params,
    quantized_linear_names,
)
from apiq_jax.models.quantized_io import QuantizedCheckpoint, is_quantized_dir, load_quantized, save_quantized

__all__ = [
    "LINEARS", "LlamaForCausalLM", "ModelConfig", "QuantizedCheckpoint", "QuantizedWeight", "apply",
    "block_forward", "block_outputs", "cast_params", "check_params", "copy_tokenizer_files",
    "dequantize_params", "embed", "final_logits", "flatten_params", "forward", "forward_embeddings",
    "hidden_states", "lazy_params",
    "hf_name", "init_params", "is_quantized_dir", "linear", "load_config", "load_hf_config",
    "load_params", "load_pretrained", "load_quantized", "load_tokenizer", "param_shapes",
    "quantize_model", "quantize_params", "quantized_linear_names", "save_pretrained",
    "save_quantized", "stack_layers", "unflatten_params", "unstack_layers", "validate_ids",
]
