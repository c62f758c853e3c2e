"""Evaluation: perplexity (the usual text protocol and a row-wise variant) and activation error.

Protocols:

* :func:`perplexity` — concatenate the evaluation text once, tokenize it, cut the ids into
  non-overlapping windows of ``seqlen`` tokens (the tail is dropped), take the mean
  next-token NLL over all windows, exponentiate.
* :func:`perplexity_ids` — token ids ``[n, seqlen]`` (or 1-D, windowed as above): each row
  is scored on its own (NLL of ``row[1:]`` given ``row[:-1]``), the mean is over all
  predicted tokens.
* :func:`activation_errors` — per decoder block ``||x_fp - x_q||^2 / ||x_fp||^2`` of the
  block outputs of a full-precision and a quantized model on the same ids.
* :func:`kl_divergence` — the mean over predicted tokens of ``KL(p_fp || p_q)``, the
  full-precision model's next-token distribution against the quantized model's (nats).

A "model" argument is a :class:`~apiq_jax.models.LlamaForCausalLM` or a params pytree
(dense or ``frozen`` with QuantizedTensor leaves) together with ``config=``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

import apiq_jax.interrupts as interrupts
import apiq_jax.sharding as sharding
from apiq_jax.data import check_ids, split_windows, tokenize
from apiq_jax.lora import Lora
from apiq_jax.models import llama
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import LlamaForCausalLM, forward
from apiq_jax.qmatmul import default_backend

_block_outputs_jit = jax.jit(llama.block_outputs, static_argnames=("config", "backend"))

__all__ = [
    "PerplexityResult", "activation_errors", "block_outputs", "kl_divergence", "kl_sums", "nll_sums",
    "perplexity", "perplexity_ids", "relative_error",
]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Outcome of a perplexity run; ``float(result)`` is the perplexity.

    Attributes:
      perplexity: ``exp(mean_nll)``.
      mean_nll: mean next-token negative log-likelihood (nats).
      tokens: number of predicted tokens averaged over.
      windows: number of rows / windows scored.
      seqlen: tokens per row.
      seconds: wall time of the scoring (compilation included).
    """

    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def __float__(self) -> float:
        return self.perplexity

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields.

        Returns:
          ``{"perplexity", "mean_nll", "tokens", "windows", "seqlen", "seconds"}``.
        """
        return dataclasses.asdict(self)


def _resolve(model: Any, config: ModelConfig | None) -> tuple[Mapping[str, Any], ModelConfig]:
    if isinstance(model, LlamaForCausalLM):
        return model.params, config or model.config
    if config is None:
        raise ValueError("config= is required when the model is given as a params pytree")
    if not isinstance(model, Mapping):
        raise ValueError(f"model must be a LlamaForCausalLM or a params dict, got {type(model).__name__}")
    return model, config


def _check_rows(ids: Any, vocab_size: int) -> np.ndarray:
    """Token ids as int32 rows ``[n, seqlen >= 2]`` in ``[0, vocab_size)`` (ValueError otherwise)."""
    arr = check_ids(ids, vocab_size)
    if arr.ndim != 2:
        raise ValueError(f"token ids must be [n, seqlen], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] < 2:
        raise ValueError(f"need at least one row of >= 2 tokens, got shape {arr.shape}")
    return arr.astype(np.int32)


@partial(jax.jit, static_argnames=("config", "backend"))
def nll_sums(
    params: Mapping[str, Any],
    lora: Lora | None,
    ids: jnp.ndarray,
    row_weight: jnp.ndarray,
    config: ModelConfig,
    backend: str | None = None,
) -> jnp.ndarray:
    """Sum over rows (weighted by ``row_weight`` [b]) of the NLL of ``ids[:, 1:]`` given the prefix.

    Jitted with ``config`` and ``backend`` static.

    Args:
      params: the model params (dense or frozen).
      lora: a :class:`~apiq_jax.lora.Lora` active in the forward, or None.
      ids: int token ids ``[b, s]``.
      row_weight: float weights ``[b]`` (1 for real rows, 0 for padding rows).
      config: the model config.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      A float32 scalar: the weighted sum over rows of the summed per-token NLLs (nats).
    """
    logits = forward(params, lora, ids, config, backend=backend)[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll.sum(axis=-1) * row_weight)


def perplexity_ids(
    model: Any,
    ids: Any,
    *,
    config: ModelConfig | None = None,
    lora: Lora | None = None,
    batch_size: int = 8,
    seqlen: int | None = None,
    backend: str | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> PerplexityResult:
    """Row-wise perplexity of token ids ``[n, seqlen]``.

    Each row is scored on its own: NLL of ``row[1:]`` given ``row[:-1]``; the mean is over
    all ``n * (seqlen - 1)`` predicted tokens. The last batch is padded with zero-weight
    rows so one compiled shape serves every batch.

    Args:
      model: a :class:`~apiq_jax.models.LlamaForCausalLM` or a params pytree (with ``config=``).
      ids: int token ids ``[n, seqlen]``, or 1-D ids cut into windows of ``seqlen``.
      config: the model config (required for a params pytree).
      lora: a :class:`~apiq_jax.lora.Lora` active in the forward, or None.
      batch_size: rows per forward pass.
      seqlen: window length for 1-D ids (must equal the row length for 2-D ids).
      backend: qmatmul backend of quantized linears (None: the default).
      progress: a tqdm bar over the batches.
      mesh: score sharded on this mesh (:func:`apiq_jax.sharding.make_mesh`): the params and
        LoRA placed by :func:`apiq_jax.sharding.place`, each batch split over the devices
        (the batch size rounded up to a multiple of the mesh's size, padding rows weighted 0).
        None: the default device.

    Returns:
      A :class:`PerplexityResult`.

    Raises:
      ValueError: a params pytree without ``config``, 1-D ids without ``seqlen``, a
        ``seqlen`` that differs from the row length of 2-D ids, ids that are not integers
        in ``[0, vocab_size)`` or not at least one row of >= 2 tokens, or a
        ``batch_size`` that is not a positive int.
    """
    params, cfg = _resolve(model, config)
    arr = np.asarray(ids)
    if arr.ndim == 1:
        if seqlen is None:
            raise ValueError("1-D token ids need seqlen= to be cut into windows")
        arr = split_windows(arr, seqlen)
    elif seqlen is not None and arr.ndim == 2 and seqlen != arr.shape[1]:
        raise ValueError(f"ids have rows of {arr.shape[1]} tokens but seqlen={seqlen}")
    arr = _check_rows(arr, cfg.vocab_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    n, length = arr.shape
    bs = min(batch_size, n)
    backend = backend or default_backend()
    if mesh is not None:
        bs = -(-bs // mesh.size) * mesh.size
        params, lora = sharding.place(params, mesh), (None if lora is None else sharding.place(lora, mesh))
    start = time.perf_counter()
    total = 0.0
    for i in tqdm(range(0, n, bs), desc="eval", unit="batch", disable=not progress, leave=False):
        interrupts.check()
        chunk = arr[i : i + bs]
        weight = np.ones(bs, np.float32)
        if chunk.shape[0] < bs:
            weight[chunk.shape[0]:] = 0.0
            chunk = np.concatenate([chunk, np.zeros((bs - chunk.shape[0], length), np.int32)])
        if mesh is None:
            chunk, weight = jnp.asarray(chunk), jnp.asarray(weight)
        else:
            chunk, weight = sharding.place_batch(chunk, mesh), sharding.place_batch(weight, mesh)
        total += float(nll_sums(params, lora, chunk, weight, cfg, backend))
    seconds = time.perf_counter() - start
    tokens = n * (length - 1)
    mean = total / tokens
    return PerplexityResult(math.exp(mean), mean, tokens, n, length, seconds)


def perplexity(
    model: Any,
    text: str,
    tokenizer: Any,
    *,
    seqlen: int = 2048,
    config: ModelConfig | None = None,
    lora: Lora | None = None,
    batch_size: int = 8,
    backend: str | None = None,
) -> PerplexityResult:
    """Perplexity of a text by the usual protocol (GPTQ, ApiQ, ...).

    The text (already joined into one string, e.g. ``"\\n\\n".join(dataset["text"])``) is
    tokenized once and cut into non-overlapping windows of ``seqlen`` tokens, the tail
    dropped; the mean next-token NLL over all windows is exponentiated.

    Args:
      model: a model or params pytree (see :func:`perplexity_ids`).
      text: the evaluation text.
      tokenizer: a Hugging Face tokenizer or a model directory holding one.
      seqlen: window length.
      config, lora, batch_size, backend: as for :func:`perplexity_ids`.

    Returns:
      A :class:`PerplexityResult`.

    Raises:
      ValueError: too little text for one window, or see :func:`perplexity_ids`.
    """
    return perplexity_ids(
        model, split_windows(tokenize(text, tokenizer), seqlen), config=config, lora=lora,
        batch_size=batch_size, backend=backend,
    )


def relative_error(x_fp: Any, x_q: Any) -> float:
    """``||x_fp - x_q||^2 / ||x_fp||^2``, summed in float64 on the host.

    Args:
      x_fp: the reference activations.
      x_q: the activations of the quantized model (same shape).

    Returns:
      The relative squared error as a Python float.
    """
    a = np.asarray(x_fp, np.float64)
    b = np.asarray(x_q, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(a * a))


def block_outputs(
    model: Any,
    ids: Any,
    *,
    config: ModelConfig | None = None,
    lora: Lora | None = None,
    attention_mask: Any = None,
    backend: str | None = None,
) -> list[jnp.ndarray]:
    """Every decoder block's output hidden states ``[b, s, D]`` (jitted), in layer order.

    The inputs of :func:`activation_errors`; the last entry, passed through
    :func:`apiq_jax.models.final_logits`, gives the logits.

    Args:
      model: a model or params pytree (with ``config=``).
      ids: int token ids ``[b, s]``.
      config: the model config (required for a params pytree).
      lora: a :class:`~apiq_jax.lora.Lora` or None.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      backend: qmatmul backend of quantized linears.

    Returns:
      One ``[b, s, D]`` array per decoder block.

    Raises:
      ValueError: a params pytree without ``config``, or ids that are not ``[b, s >= 2]``
        integers in ``[0, vocab_size)``.
    """
    params, cfg = _resolve(model, config)
    arr = _check_rows(ids, cfg.vocab_size)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return _block_outputs_jit(params, jnp.asarray(arr), cfg, lora=lora, attention_mask=mask,
                              backend=backend or default_backend())


def _model_pair(fp_model: Any, q_model: Any, ids: Any, config: ModelConfig | None,
                batch_size: Any) -> tuple[Mapping[str, Any], Mapping[str, Any], ModelConfig, np.ndarray]:
    """Check the arguments of a comparison of two models (:func:`activation_errors`, :func:`kl_divergence`).

    Returns:
      ``(fp_params, q_params, config, ids as [n, seqlen] int32)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    fp_params, cfg = _resolve(fp_model, config)
    q_params, _ = _resolve(q_model, cfg)
    return fp_params, q_params, cfg, _check_rows(ids, cfg.vocab_size)


def activation_errors(
    fp_model: Any,
    q_model: Any,
    ids: Any,
    *,
    config: ModelConfig | None = None,
    lora: Lora | None = None,
    batch_size: int = 8,
    backend: str | None = None,
) -> list[float]:
    """Per-block relative activation error of ``q_model`` (with optional LoRA) vs ``fp_model``.

    For block i: ``sum ||x_fp_i - x_q_i||^2 / sum ||x_fp_i||^2`` over all rows of ``ids``
    ``[n, seqlen]``, where ``x_i`` is block i's output hidden state (see
    :func:`apiq_jax.models.block_outputs`).

    Args:
      fp_model: the full-precision model or params (the reference).
      q_model: the quantized model or frozen params.
      ids: int token ids ``[n, seqlen]``.
      config: the model config (required for params pytrees).
      lora: the quantized model's :class:`~apiq_jax.lora.Lora`, or None.
      batch_size: rows per forward pass.
      backend: qmatmul backend of quantized linears.

    Returns:
      One relative error per decoder block.

    Raises:
      ValueError: a params pytree without ``config``, ids that are not ``[n, seqlen >= 2]``
        integers in ``[0, vocab_size)``, or a ``batch_size`` that is not a positive int.
    """
    fp_params, q_params, cfg, arr = _model_pair(fp_model, q_model, ids, config, batch_size)
    num = np.zeros(cfg.num_hidden_layers)
    den = np.zeros(cfg.num_hidden_layers)
    backend = backend or default_backend()
    for i in range(0, arr.shape[0], batch_size):
        chunk = jnp.asarray(arr[i : i + batch_size])
        fp = _block_outputs_jit(fp_params, chunk, cfg, backend=backend)
        q = _block_outputs_jit(q_params, chunk, cfg, lora=lora, backend=backend)
        for j, (a, b) in enumerate(zip(fp, q)):
            a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
            num[j] += float(jnp.sum((a32 - b32) ** 2))
            den[j] += float(jnp.sum(a32 * a32))
    return [float(x) for x in num / den]


@partial(jax.jit, static_argnames=("config", "backend"))
def kl_sums(fp_params: Mapping[str, Any], q_params: Mapping[str, Any], lora: Lora | None, ids: jnp.ndarray,
            config: ModelConfig, backend: str | None = None) -> jnp.ndarray:
    """Sum over the predicted tokens of ``ids`` of ``KL(p_fp || p_q)`` of the next-token distributions.

    Jitted with ``config`` and ``backend`` static.

    Args:
      fp_params: the reference (full-precision) params.
      q_params: the compared params (dense or frozen).
      lora: a :class:`~apiq_jax.lora.Lora` active in the compared model's forward, or None.
      ids: int token ids ``[b, s]`` (positions ``0 .. s-2`` predict).
      config: the model config.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      A float32 scalar (nats).
    """
    lp = jax.nn.log_softmax(forward(fp_params, None, ids, config, backend=backend)[:, :-1].astype(jnp.float32), -1)
    lq = jax.nn.log_softmax(forward(q_params, lora, ids, config, backend=backend)[:, :-1].astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq))


def kl_divergence(
    fp_model: Any,
    q_model: Any,
    ids: Any,
    *,
    config: ModelConfig | None = None,
    lora: Lora | None = None,
    batch_size: int = 8,
    backend: str | None = None,
) -> float:
    """Mean ``KL(p_fp || p_q)`` over the predicted tokens of ``ids``: how far ``q_model``'s predictions are.

    Unlike perplexity it is zero only for the reference's own predictions, so it ranks
    quantized models by fidelity where their perplexities differ by less than the effect of a
    slightly sharper or flatter distribution (e.g. at 3 and 4 bits).

    Args:
      fp_model, q_model, ids, config, lora, batch_size, backend: as for :func:`activation_errors`
        (``fp_model`` is the reference, ``lora`` the quantized model's).

    Returns:
      The mean KL divergence in nats per predicted token.

    Raises:
      ValueError: a params pytree without ``config``, ids that are not ``[n, seqlen >= 2]``
        integers in ``[0, vocab_size)``, or a ``batch_size`` that is not a positive int.

    Example:
      >>> from apiq_jax.demo_data import DEMO_MODEL_DIR
      >>> from apiq_jax.models import load_pretrained
      >>> model = load_pretrained(DEMO_MODEL_DIR)
      >>> kl_divergence(model, model, [[1, 5, 9, 2]])
      0.0
    """
    fp_params, q_params, cfg, arr = _model_pair(fp_model, q_model, ids, config, batch_size)
    backend = backend or default_backend()
    total = 0.0
    for i in range(0, arr.shape[0], batch_size):
        total += float(kl_sums(fp_params, q_params, lora, jnp.asarray(arr[i : i + batch_size]), cfg, backend))
    return total / (arr.shape[0] * (arr.shape[1] - 1))
