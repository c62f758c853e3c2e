"""Autoregressive generation with a KV cache: one jitted prefill, one jitted decode step.

The decoder math is the one of :mod:`apiq_jax.models.llama` (``linear``, ``rms_norm``,
``apply_rope``, ``mlp``, ``final_logits``); only the attention is re-wired to read keys and
values from a cache. A quantized linear goes through :func:`apiq_jax.qmatmul.qmatmul` as
everywhere else (on GPU/TPU the decode step ``M = batch`` is the kernels' small-M case).

Prompts of different lengths are left-padded to one length; as transformers does, every
row's RoPE positions count only its real tokens (``cumsum(mask) - 1``) and padding is
never attended to. Sampling: ``temperature=0`` is greedy (argmax); otherwise the logits are
divided by the temperature, cut to the ``top_k`` largest and to the smallest set whose
probability reaches ``top_p``, and sampled with a key drawn from ``seed``.

With ``mesh=`` (:func:`apiq_jax.sharding.make_mesh`) the prompts and the KV cache are split
over the ``data`` axis by rows (the batch padded with copies of the last prompt to a multiple
of it, the copies dropped), the params and LoRA placed by :func:`apiq_jax.sharding.place`;
each process reads every step's tokens gathered (:func:`apiq_jax.sharding.to_host`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

import apiq_jax.sharding as sharding
from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import (
    _attend,
    apply_rope,
    embed,
    final_logits,
    is_stacked,
    linear,
    mlp,
    rms_norm,
    rope_cos_sin,
    unstack_layers,
)
from apiq_jax.qmatmul import default_backend

#: a layer's cache: (keys, values), each ``[b, T, kv_heads, head_dim]``
Cache = list[tuple[jnp.ndarray, jnp.ndarray]]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
      tokens: int32 ``[b, n]`` new tokens per prompt (``n <= max_new_tokens``; after a row
        emits an ``eos_token_id`` it is filled with ``pad_token_id``).
      logits: float32 ``[b, n, V]`` logits each token was chosen from (only with
        ``return_logits=True``), else None.
      prefill_seconds: wall time of the prefill (compilation included on a first call).
      decode_seconds: wall time of the ``n - 1`` decode steps.
    """

    tokens: np.ndarray
    logits: np.ndarray | None
    prefill_seconds: float
    decode_seconds: float


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token-id prompts to one length.

    Args:
      prompts: one sequence of int ids per row (each non-empty).
      pad_token_id: id written into the padding.

    Returns:
      ``(ids [b, P] int32, attention_mask [b, P] int32)`` with 1 on real tokens.

    Raises:
      ValueError: no prompts, or an empty prompt.
    """
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    ids = np.full((len(prompts), n), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), n), np.int32)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = np.asarray(p, np.int32)
        mask[i, n - len(p):] = 1
    return ids, mask


def _pad_rows(ids: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows appended (copies of the last) until their count is a multiple of ``multiple``."""
    extra = -ids.shape[0] % multiple
    if not extra:
        return ids, mask
    return (np.concatenate([ids, np.repeat(ids[-1:], extra, axis=0)]),
            np.concatenate([mask, np.repeat(mask[-1:], extra, axis=0)]))


def _layer_lora(lora: Lora | None, i: int) -> Lora | None:
    return None if lora is None else lora["layers"][i]


def _cached_block(p, x, config, lora, cos, sin, cache, start, key_mask, layer_idx, backend):
    """One decoder block on ``x [b, s, D]`` whose keys/values go to cache rows ``[start, start+s)``."""
    b, s, _ = x.shape
    h_, kvh, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    k_cache, v_cache = cache
    t = k_cache.shape[1]
    h = rms_norm(x, p["input_layernorm"], config.rms_norm_eps)

    def proj(name: str) -> jnp.ndarray:
        lo = None if lora is None else lora.get(name)
        return linear(h, p[name], lo, bias=p.get(f"{name}_bias"), backend=backend)

    q = apply_rope(proj("q_proj").reshape(b, s, h_, hd), cos, sin)
    k = apply_rope(proj("k_proj").reshape(b, s, kvh, hd), cos, sin)
    v = proj("v_proj").reshape(b, s, kvh, hd)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
    qpos = start + jnp.arange(s)[:, None]
    kpos = jnp.arange(t)[None, :]
    allowed = kpos <= qpos
    window = config.attention_window(layer_idx)
    if window is not None:  # the window counts cache slots; padding sits before every real token
        allowed = allowed & (kpos > qpos - window)
    mask = allowed[None] & key_mask.astype(bool)[:, None, :]
    out = _attend(q.reshape(b, s, kvh, config.num_kv_groups, hd), k_cache, v_cache, mask)
    lo = None if lora is None else lora.get("o_proj")
    x = x + linear(out.reshape(b, s, h_ * hd), p["o_proj"], lo, bias=p.get("o_proj_bias"), backend=backend)
    h = rms_norm(x, p["post_attention_layernorm"], config.rms_norm_eps)
    return x + mlp(p, h, lora=lora, backend=backend), (k_cache, v_cache)


def _run_cached(params, lora, ids, positions, cache, start, key_mask, config, backend):
    """Logits ``[b, V]`` (float32) of the last position of ``ids [b, s]`` and the updated cache."""
    x = embed(params, ids, config)
    cos, sin = rope_cos_sin(positions, config, x.dtype)
    new_cache = []
    for i, p in enumerate(params["layers"]):
        x, c = _cached_block(p, x, config, _layer_lora(lora, i), cos, sin, cache[i], start, key_mask, i, backend)
        new_cache.append(c)
    logits = final_logits(params, x[:, -1:], config, backend=backend, dtype=jnp.float32)[:, 0]
    return logits, new_cache


def sample_logits(
    logits: jnp.ndarray, key: jax.Array, *, temperature: float | jnp.ndarray, top_k: int | jnp.ndarray,
    top_p: float | jnp.ndarray, greedy: bool,
) -> jnp.ndarray:
    """One token per row from float logits ``[b, V]``.

    Args:
      logits: ``[b, V]``.
      key: a jax PRNG key (unused when ``greedy``).
      temperature: divides the logits (> 0 unless ``greedy``).
      top_k: keep the ``top_k`` largest logits (0: all; a traced int is fine).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
      greedy: argmax (ties to the lowest id, as torch).

    Returns:
      int32 ``[b]``.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    kth = jax.lax.dynamic_index_in_dim(sorted_logits, k - 1, axis=-1)  # [b, 1]: the k-th largest
    logits = jnp.where(logits < kth, neg, logits)
    sorted_logits = jnp.where(sorted_logits < kth, neg, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "backend", "cache_len", "greedy", "rows"))
def _prefill(params, lora, ids, mask, key, temperature, top_k, top_p, *, config, backend, cache_len, greedy, rows):
    b, s = ids.shape
    dtype = embed(params, ids[:, :1], config).dtype
    shape = (b, cache_len, config.num_key_value_heads, config.head_dim)

    def zeros() -> jnp.ndarray:  # split by rows like the prompts when ``rows`` (a NamedSharding) is given
        z = jnp.zeros(shape, dtype)
        return z if rows is None else jax.lax.with_sharding_constraint(z, rows)

    cache = [(zeros(), zeros()) for _ in params["layers"]]
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    key_mask = jnp.concatenate([mask, jnp.ones((b, cache_len - s), mask.dtype)], axis=-1)
    logits, cache = _run_cached(params, lora, ids, positions, cache, 0, key_mask, config, backend)
    token = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return token, logits, cache, key_mask


@functools.partial(jax.jit, static_argnames=("config", "backend", "greedy"), donate_argnames=("cache",))
def _decode_step(params, lora, token, position, index, cache, key_mask, key, temperature, top_k, top_p, *, config,
                 backend, greedy):
    logits, cache = _run_cached(params, lora, token[:, None], position[:, None], cache, index, key_mask, config,
                                backend)
    nxt = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return nxt, logits, cache


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


def generate(
    params: Mapping[str, Any],
    lora: Lora | None,
    prompts: Sequence[Sequence[int]],
    config: ModelConfig,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    backend: str | None = None,
    callback: Callable[[np.ndarray], None] | None = None,
    return_logits: bool = False,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt (a batch, left-padded).

    Args:
      params: the model params (dense or frozen with QuantizedTensor linears; stacked layers
        are unstacked first).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      prompts: one sequence of int token ids per row.
      config: the model config.
      max_new_tokens: the most tokens generated per row.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k: sample among the ``top_k`` most likely tokens (0: all).
      top_p: nucleus sampling threshold (1: off).
      seed: seeds the sampling keys (same seed, same tokens).
      eos_token_id: an id (or several) after which a row stops; generation ends when every row has.
      pad_token_id: fills the left padding and the slots after a row's end.
      backend: qmatmul backend of quantized linears (None: the default).
      callback: called with the ``[b]`` int32 tokens of every step as soon as they exist
        (for streaming).
      return_logits: also return the float32 logits of every step.
      mesh: generate sharded on this mesh: rows (prompts, KV cache) over its ``data`` axis,
        params and LoRA by :func:`apiq_jax.sharding.place`; None: one device.

    Returns:
      A :class:`GenerationResult`.

    Raises:
      ValueError: bad sampling settings, empty prompts, ids out of the vocabulary, or
        prompt plus new tokens longer than ``config.max_position_embeddings``.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids, mask = left_pad(prompts, pad_token_id)
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        bad = int(ids[(ids < 0) | (ids >= config.vocab_size)][0])
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    total = ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    if is_stacked(params):
        params = unstack_layers(params)
    if lora is not None and lora.is_stacked:
        lora = lora.unstack_layers()
    backend = backend or default_backend()
    n_rows, rows = ids.shape[0], None
    if mesh is not None:
        ids, mask = _pad_rows(ids, mask, mesh.shape["data"])
        params, lora = sharding.place(params, mesh), (None if lora is None else sharding.place(lora, mesh))
        rows = NamedSharding(mesh, sharding.batch_spec(mesh, ids.shape[0]))
        put = functools.partial(sharding.place_batch, mesh=mesh)
    else:
        put = jnp.asarray
    greedy = temperature == 0
    temp = jnp.float32(temperature if not greedy else 1.0)
    tp, tk = jnp.float32(top_p), jnp.int32(top_k)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    b = ids.shape[0]
    static = dict(config=config, backend=backend, greedy=greedy)
    t0 = time.perf_counter()
    token, logits, cache, key_mask = _prefill(params, lora, put(ids), put(mask), keys[0], temp, tk, tp,
                                              cache_len=total, rows=rows, **static)
    out_tokens, out_logits = [], []
    done = np.zeros(b, bool)
    positions = mask.sum(axis=1).astype(np.int32)  # RoPE position of the next token of each row
    prefill_seconds = decode_seconds = 0.0
    for step in range(max_new_tokens):
        tok = sharding.to_host(token)  # every row, on every process
        if step == 0:
            prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
        tok = np.where(done, pad_token_id, tok).astype(np.int32)
        out_tokens.append(tok)
        if return_logits:
            out_logits.append(sharding.to_host(logits)[:n_rows])
        if callback is not None:
            callback(tok[:n_rows])
        if eos_token_id is not None:
            done |= np.isin(tok, np.atleast_1d(np.asarray(eos_token_id)))
        if step == max_new_tokens - 1 or done.all():
            break
        token, logits, cache = _decode_step(
            params, lora, put(tok), put(positions), jnp.int32(ids.shape[1] + step), cache, key_mask,
            keys[step + 1], temp, tk, tp, **static)
        positions = positions + 1
    if len(out_tokens) > 1:
        decode_seconds = time.perf_counter() - t0
    return GenerationResult(
        tokens=np.stack(out_tokens, axis=1)[:n_rows],
        logits=np.stack(out_logits, axis=1) if return_logits else None,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )


__all__ = ["GenerationResult", "generate", "left_pad", "sample_logits"]
