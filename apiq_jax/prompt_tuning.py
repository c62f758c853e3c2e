"""Prompt tuning (Lester et al., 2021) on top of a frozen, possibly quantized, model.

A soft prompt is ``n`` learned vectors ``[n, D]`` placed in front of the embedded input;
everything else (quantized weights, embeddings, LoRA if any) stays frozen. It composes
with LoRA: pass the LoRA tree to :func:`prompt_forward` to run both. Train it with
:func:`apiq_jax.training.finetune` and ``loss_fn=prompt_loss_fn(config)``::

    prompt = init_prompt(frozen, config, 16, key=jax.random.key(0))
    prompt, losses = finetune(frozen, prompt, train_ids, config, cfg, loss_fn=prompt_loss_fn(config))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import embed, forward_embeddings
from apiq_jax.quant import QuantizedTensor, dequantize
from apiq_jax.training import forward_loss_fn

PROMPT_INITS = ("vocab", "normal")


def _embedding_table(params: Mapping[str, Any]) -> jnp.ndarray:
    table = params["embed_tokens"]
    return dequantize(table) if isinstance(table, QuantizedTensor) else table


def init_prompt(
    params: Mapping[str, Any], config: ModelConfig, n_tokens: int, *, key: jax.Array, init: str = "vocab"
) -> jnp.ndarray:
    """A soft prompt ``[n_tokens, D]`` (float32).

    ``init="vocab"`` copies the embeddings of ``n_tokens`` random vocabulary entries (the
    initialisation Lester et al. found best); ``"normal"`` draws N(0, sigma^2) with sigma the
    standard deviation of the embedding table.

    Args:
      params: the frozen model params (``embed_tokens`` dense or a QuantizedTensor).
      config: the model config.
      n_tokens: number of soft-prompt vectors.
      key: a jax PRNG key.
      init: ``"vocab"`` or ``"normal"`` (see above); with ``"vocab"`` the entries are drawn
        without replacement unless ``n_tokens > vocab_size``.

    Returns:
      The soft prompt ``[n_tokens, D]``, float32.

    Raises:
      ValueError: ``n_tokens`` is not a positive int, or ``init`` is not in
        :data:`PROMPT_INITS`.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive int")
    if init not in PROMPT_INITS:
        raise ValueError(f"init={init!r} is not supported; accepted: {PROMPT_INITS}")
    table = _embedding_table(params).astype(jnp.float32)
    if init == "vocab":
        rows = jax.random.choice(key, config.vocab_size, (n_tokens,), replace=n_tokens > config.vocab_size)
        return table[rows]
    return jax.random.normal(key, (n_tokens, config.hidden_size), jnp.float32) * jnp.std(table)


def prompt_forward(
    params: Mapping[str, Any],
    prompt: jnp.ndarray,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    lora: Lora | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` at the positions of ``ids [b, s]`` with ``prompt [n, D]`` prepended.

    Args:
      params: the frozen model params.
      prompt: the soft prompt ``[n, D]`` (cast to the embedding's dtype).
      ids: int token ids ``[b, s]``.
      config: the model config.
      lora: the model's :class:`~apiq_jax.lora.Lora`, active in the linears, or None.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      Logits ``[b, s, V]`` of the ``ids`` positions only (the ``n`` prompt positions are
      dropped), in the embedding's dtype.

    Raises:
      ValueError: ``prompt`` is not ``[n, hidden_size]``.
    """
    if prompt.ndim != 2 or prompt.shape[1] != config.hidden_size:
        raise ValueError(f"prompt has shape {prompt.shape}; expected [n_tokens, {config.hidden_size}]")
    x = embed(params, ids, config)
    soft = jnp.broadcast_to(prompt.astype(x.dtype)[None], (x.shape[0], *prompt.shape))
    logits = forward_embeddings(params, lora, jnp.concatenate([soft, x], axis=1), config, backend=backend)
    return logits[:, prompt.shape[0]:]


def prompt_loss_fn(
    config: ModelConfig, *, lora: Lora | None = None, backend: str | None = None
) -> Callable[[Mapping[str, Any], jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """``loss(frozen, prompt, ids)``: mean next-token NLL of ``ids`` after the soft prompt.

    Args:
      config: the model config.
      lora: a :class:`~apiq_jax.lora.Lora` applied in the forward but not trained (it is
        a constant of the loss), or None.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      ``loss(frozen, prompt, ids)`` returning a float32 scalar, for
      ``finetune(..., loss_fn=...)``; gradients are stopped at ``frozen``.
    """
    return forward_loss_fn(prompt_forward, config, lora=lora, backend=backend)
