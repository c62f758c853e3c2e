"""apiq-jax: finetuning of 2/3/4-bit quantized LLMs with ApiQ in JAX.

The public API, re-exported from the modules that implement it:

* quantizers (:mod:`apiq_jax.quant`): :class:`QuantConfig`, :func:`quantize`,
  :func:`dequantize`, :func:`fake_quantize`, :class:`QuantizedTensor`;
* models (:mod:`apiq_jax.models`): :func:`load_pretrained`, :func:`save_pretrained`,
  :func:`quantize_model`, :func:`apply`, :func:`save_quantized`, :func:`load_quantized`;
* LoRA (:mod:`apiq_jax.lora`): :class:`LoraConfig`, :func:`init_lora`, :func:`merge_lora`;
* calibration (:mod:`apiq_jax.calibration`): :func:`apiq_bw`, :func:`apiq_lw` and the
  baselines :func:`rtn_init`, :func:`qlora_init`, :func:`loftq_init`, :func:`gptq_init`;
* evaluation (:mod:`apiq_jax.evaluate`): :func:`perplexity`, :func:`activation_errors`;
* finetuning (:mod:`apiq_jax.training`): :class:`FinetuneConfig`, :func:`finetune` (LoRA, or any
  pytree with a ``loss_fn``: a soft prompt from :mod:`apiq_jax.prompt_tuning`, bottleneck
  adapters from :mod:`apiq_jax.adapters`);
* quantization-aware training (:mod:`apiq_jax.qat`): :func:`qat_split`, :func:`qat_loss_fn`,
  :func:`qat_optimizer`, :func:`qat_freeze`.

Submodules not re-exported here (``apiq_jax.qmatmul``, ``apiq_jax.checkpoint``,
``apiq_jax.compare``) are public too; import them directly.
"""

from apiq_jax.adapters import adapter_forward, adapter_loss_fn, init_adapters
from apiq_jax.calibration import (
    METHODS,
    ApiQOptions,
    CalibrationReport,
    CalibrationResult,
    apiq_bw,
    apiq_lw,
    get_method,
    gptq_init,
    loftq_init,
    qlora_init,
    rtn_init,
)
from apiq_jax.data import windows
from apiq_jax.evaluate import activation_errors, perplexity, perplexity_ids
from apiq_jax.lora import Lora, LoraConfig, init_lora, lora_from_factors, merge_lora
from apiq_jax.models import (
    LlamaForCausalLM,
    ModelConfig,
    apply,
    load_pretrained,
    load_quantized,
    load_tokenizer,
    quantize_model,
    save_pretrained,
    save_quantized,
)
from apiq_jax.prompt_tuning import init_prompt, prompt_forward, prompt_loss_fn
from apiq_jax.qat import qat_freeze, qat_loss_fn, qat_optimizer, qat_split
from apiq_jax.quant import (
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
    "METHODS", "ApiQOptions", "adapter_forward", "adapter_loss_fn", "init_adapters", "CalibrationReport", "CalibrationResult", "FinetuneConfig",
    "LlamaForCausalLM", "Lora", "LoraConfig", "ModelConfig", "QuantConfig", "QuantizedTensor",
    "activation_errors", "apiq_bw", "apiq_lw", "apply", "bits_per_param", "dequantize",
    "fake_quantize", "finetune", "get_method", "gptq_init", "init_lora", "init_prompt", "load_pretrained",
    "load_quantized", "load_tokenizer", "loftq_init", "lora_from_factors", "merge_lora",
    "perplexity", "perplexity_ids", "prompt_forward", "prompt_loss_fn", "qat_freeze", "qat_loss_fn", "qat_optimizer", "qat_split", "qlora_init", "quantize", "quantize_model", "rtn_init",
    "save_pretrained", "save_quantized", "windows",
]
