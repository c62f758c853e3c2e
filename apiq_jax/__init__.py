"""apiq-jax: finetuning of 2/3/4-bit quantized LLMs with ApiQ in JAX."""

__version__ = "0.1.0"
