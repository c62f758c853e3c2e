"""apiq-jax: finetuning of 2/3/4-bit quantized LLMs with ApiQ in JAX.

The public API, re-exported from the modules that implement it (``docs/architecture.md``
describes the layers and the data model):

* quantizers (:mod:`apiq_jax.quant`): :class:`QuantConfig`, :func:`quantize`,
  :func:`dequantize`, :func:`fake_quantize`, :class:`QuantizedTensor`, :class:`ClipLogits`,
  :func:`bits_per_param`;
* token data (:mod:`apiq_jax.data`): :func:`windows` (text, a file or ids -> ``[n, seqlen]``),
  :func:`load_tokenizer`;
* models (:mod:`apiq_jax.models`): :func:`load_pretrained`, :func:`save_pretrained`,
  :func:`quantize_model`, :func:`apply`, :func:`save_quantized`, :func:`load_quantized`;
* LoRA (:mod:`apiq_jax.lora`): :class:`Lora` (factors + their :class:`LoraConfig`),
  :func:`init_lora`, :func:`lora_from_factors`, :func:`merge_lora`;
* calibration (:mod:`apiq_jax.calibration`): :func:`apiq_bw`, :func:`apiq_lw`
  (:class:`ApiQOptions`) and the baselines :func:`rtn_init`, :func:`qlora_init`,
  :func:`loftq_init`, :func:`gptq_init`; the registry :data:`METHODS` of
  :class:`MethodSpec` and :func:`get_method`;
* evaluation (:mod:`apiq_jax.evaluate`): :func:`perplexity`, :func:`perplexity_ids`,
  :func:`activation_errors`, :func:`kl_divergence`;
* generation (:mod:`apiq_jax.generation`): :func:`generate` (KV cache, greedy or sampled)
  and its :class:`GenerationResult`;
* finetuning (:mod:`apiq_jax.training`): :class:`FinetuneConfig`, :func:`finetune` (LoRA, or
  any pytree with a ``loss_fn``: a soft prompt from :mod:`apiq_jax.prompt_tuning`,
  bottleneck adapters from :mod:`apiq_jax.adapters`);
* quantization-aware training (:mod:`apiq_jax.qat`): :func:`qat_split`, :func:`qat_loss_fn`,
  :func:`qat_optimizer`, :func:`qat_freeze`.

Submodules not re-exported here (``apiq_jax.qmatmul``, ``apiq_jax.checkpoint``,
``apiq_jax.compare``, ``apiq_jax.plotting``) are public too; import them directly.
"""

from apiq_jax.adapters import adapter_forward, adapter_loss_fn, init_adapters
from apiq_jax.calibration import (
    METHODS,
    ApiQOptions,
    CalibrationReport,
    CalibrationResult,
    MethodSpec,
    apiq_bw,
    apiq_lw,
    cloq_init,
    get_method,
    gptq_init,
    loftq_init,
    qlora_init,
    rtn_init,
)
from apiq_jax.data import load_tokenizer, windows
from apiq_jax.evaluate import activation_errors, kl_divergence, perplexity, perplexity_ids
from apiq_jax.generation import GenerationResult, generate
from apiq_jax.lora import Lora, LoraConfig, init_lora, lora_from_factors, merge_lora
from apiq_jax.models import (
    LlamaForCausalLM,
    ModelConfig,
    apply,
    load_pretrained,
    load_quantized,
    quantize_model,
    save_pretrained,
    save_quantized,
)
from apiq_jax.prompt_tuning import init_prompt, prompt_forward, prompt_loss_fn
from apiq_jax.qat import qat_freeze, qat_loss_fn, qat_optimizer, qat_split
from apiq_jax.quant import (
    ClipLogits,
    QuantConfig,
    QuantizedTensor,
    bits_per_param,
    dequantize,
    fake_quantize,
    quantize,
)
from apiq_jax.training import FinetuneConfig, finetune

__version__ = "0.1.0"

__all__ = [
    # quantizers
    "ClipLogits", "QuantConfig", "QuantizedTensor", "bits_per_param", "dequantize", "fake_quantize", "quantize",
    # data and models
    "LlamaForCausalLM", "ModelConfig", "apply", "load_pretrained", "load_quantized", "load_tokenizer",
    "quantize_model", "save_pretrained", "save_quantized", "windows",
    # LoRA
    "Lora", "LoraConfig", "init_lora", "lora_from_factors", "merge_lora",
    # calibration
    "METHODS", "ApiQOptions", "CalibrationReport", "CalibrationResult", "MethodSpec", "apiq_bw", "apiq_lw",
    "cloq_init", "get_method", "gptq_init", "loftq_init", "qlora_init", "rtn_init",
    # evaluation and finetuning
    "FinetuneConfig", "activation_errors", "finetune", "kl_divergence", "perplexity", "perplexity_ids",
    # generation
    "GenerationResult", "generate",
    # other PEFT methods and QAT
    "adapter_forward", "adapter_loss_fn", "init_adapters", "init_prompt", "prompt_forward", "prompt_loss_fn",
    "qat_freeze", "qat_loss_fn", "qat_optimizer", "qat_split",
]
