"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2): pure-functional core + NNX facade.

Parameters are a plain pytree, weights in PyTorch ``[out, in]`` layout, keyed by HF-like
names::

    {"embed_tokens": [V, D],
     "layers": [{"input_layernorm": [D],
                 "q_proj": W, "k_proj": W, "v_proj": W, "o_proj": W,
                 "q_proj_bias": [.], ...          (only where the architecture has biases)
                 "post_attention_layernorm": [D],
                 "gate_proj": W, "up_proj": W, "down_proj": W}, ...],
     "norm": [D],
     "lm_head": [V, D]}                            (absent when embeddings are tied)

A linear leaf ``W`` is a dense ``[out, in]`` array or an
:class:`apiq_jax.quant.QuantizedTensor` quantized from it (groups along ``in``). A
:class:`apiq_jax.lora.Lora` mirrors it (``{"layers": [{"q_proj": {"a": [in, r], "b": [r, out]},
...}, ...]}`` with its rank and alpha as static metadata) and a targeted linear computes
``y = x @ W.T + lora.scale * (x @ a) @ b``.

``backend`` (static) picks the low-bit matmul of quantized linears
(:func:`apiq_jax.qmatmul.qmatmul`): None means :func:`apiq_jax.qmatmul.default_backend`.

The functions here are the single implementation of the math; :class:`LlamaForCausalLM`
(Flax NNX) and the calibration code call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apiq_jax.data import check_ids
from apiq_jax.lora import LINEARS, MLP_LINEARS, Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.qmatmul import default_backend, qmatmul
from apiq_jax.quant import QuantizedTensor, dequantize

NORMS = ("input_layernorm", "post_attention_layernorm")

Params = dict[str, Any]

def is_quantized(w: Any) -> bool:
    """True for a :class:`QuantizedTensor` leaf.

    Args:
      w: a params leaf.

    Returns:
      Whether ``w`` is a QuantizedTensor.
    """
    return isinstance(w, QuantizedTensor)


# --- shapes and flat names ----------------------------------------------------------------
def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``[out, in]`` shape of each of the seven linears of one decoder layer.

    Args:
      config: the model config.

    Returns:
      ``{name: (out, in)}`` for the names of :data:`~apiq_jax.lora.LINEARS`.
    """
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of one decoder layer (biases included where the config has them).

    Args:
      config: the model config.

    Returns:
      ``{name: shape}``: the two norms ``(D,)``, the seven linears ``(out, in)`` and a
      ``"<linear>_bias"`` ``(out,)`` for each biased linear.
    """
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm": (config.hidden_size,),
        "post_attention_layernorm": (config.hidden_size,),
    }
    lin = linear_shapes(config)
    shapes.update(lin)
    biased = []
    if config.qkv_bias:
        biased += ["q_proj", "k_proj", "v_proj"]
    if config.o_bias:
        biased.append("o_proj")
    if config.mlp_bias:
        biased += list(MLP_LINEARS)
    for name in biased:
        shapes[f"{name}_bias"] = (lin[name][0],)
    return shapes


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat name (``"layers.3.q_proj"``) -> shape of every parameter the model needs.

    Args:
      config: the model config.

    Returns:
      ``{flat_name: shape}``; ``"lm_head"`` only when the embeddings are not tied.
    """
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (config.vocab_size, config.hidden_size)}
    layer = layer_param_shapes(config)
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    shapes["norm"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    return shapes


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params (or a LoRA tree) -> ``{"layers.0.q_proj": leaf, ...}``.

    QuantizedTensor values are kept whole (they are leaves here). LoRA ``{"a", "b"}``
    dicts flatten to ``"layers.0.q_proj.a"`` / ``".b"``.

    Args:
      params: nested dicts and lists (the params, or a LoRA factor tree such as
        ``lora.factors``); None values are skipped.

    Returns:
      ``{dotted_name: leaf}`` in traversal order.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if node is None:
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}" if prefix else str(i), v)
        else:
            flat[prefix] = node

    walk("", params)
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
    """Inverse of :func:`flatten_params`: ``"layers.<i>.<rest>"`` keys become a list of dicts.

    Args:
      flat: ``{dotted_name: leaf}``.

    Returns:
      The nested params; ``"layers"`` is a list ordered by layer index.

    Raises:
      ValueError: a ``"layers."`` key without an integer index and a name, or layer
        indices with gaps.
    """
    out: dict[str, Any] = {}
    layers: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "layers":
            if len(parts) < 3 or not parts[1].isdigit():
                raise ValueError(f"bad parameter name {key!r}; expected 'layers.<index>.<name>'")
            node = layers.setdefault(int(parts[1]), {})
            rest = parts[2:]
        else:
            node, rest = out, parts
        for p in rest[:-1]:
            node = node.setdefault(p, {})
        node[rest[-1]] = value
    if layers:
        n = max(layers) + 1
        missing = sorted(set(range(n)) - set(layers))
        if missing:
            raise ValueError(f"layers {missing} are missing (found indices {sorted(layers)})")
        out["layers"] = [layers[i] for i in range(n)]
    return out


def check_params(params: Mapping[str, Any], config: ModelConfig) -> None:
    """Raise ValueError naming every missing, unexpected or wrongly shaped parameter.

    Args:
      params: the params pytree (an ``"lm_head": None`` entry counts as absent).
      config: the model config (see :func:`param_shapes`).

    Returns:
      None.

    Raises:
      ValueError: ``params`` is not a dict, or does not match the config.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict pytree, got {type(params).__name__}")
    expected = param_shapes(config)
    flat = flatten_params({k: v for k, v in params.items() if not (k == "lm_head" and v is None)})
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    bad = [
        f"{k}: expected {expected[k]}, got {tuple(flat[k].shape)}"
        for k in sorted(set(expected) & set(flat))
        if tuple(flat[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if bad:
        problems.append("wrong shapes: " + "; ".join(bad[:8]))
    if problems:
        raise ValueError(f"params do not match the {config.architecture} config: " + " | ".join(problems))


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) weights and biases, unit norms) for ``config``.

    Drawn with numpy's generator seeded from ``key`` (compiling threefry for every shape
    costs seconds on CPU; these are test/benchmark weights, not a training init).

    Args:
      config: the model config.
      key: a jax PRNG key (its key data seeds the numpy generator).
      dtype: dtype of every parameter.
      std: standard deviation of the weights and biases.

    Returns:
      The nested params pytree with the shapes of :func:`param_shapes`.
    """
    seed = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint32).tolist()
    rng = np.random.default_rng(seed)
    flat: dict[str, Any] = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("layernorm") or name == "norm":
            flat[name] = jnp.ones(shape, dtype)
        else:
            flat[name] = jnp.asarray((std * rng.standard_normal(shape, np.float32)), dtype=dtype)
    return unflatten_params(flat)


# --- building blocks ----------------------------------------------------------------------
def _dense_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x @ w.T`` for ``w`` in ``[out, in]`` layout, accumulated in float32."""
    y = jax.lax.dot_general(
        x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y.astype(x.dtype)


def linear(
    x: jnp.ndarray,
    w: Any,
    lora: Lora | None = None,
    *,
    bias: jnp.ndarray | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """``x @ W^T (+ bias) + lora.scale * (x @ a) @ b``.

    Args:
      x: activations ``[..., in]``.
      w: a dense ``[out, in]`` array or a QuantizedTensor (storage or kernel layout; routed
        to :func:`apiq_jax.qmatmul.qmatmul`: Pallas kernels on GPU/TPU, fused XLA
        dequant-matmul on CPU).
      lora: the linear's one-linear :class:`~apiq_jax.lora.Lora`, or None.
      bias: optional ``[out]`` bias.
      backend: qmatmul backend for a quantized ``w`` (None: the default).

    Returns:
      ``[..., out]`` in ``x``'s dtype.
    """
    if isinstance(w, QuantizedTensor):
        lead = x.shape[:-1]
        y = qmatmul(x.reshape(-1, x.shape[-1]), w, backend=backend).astype(x.dtype).reshape(*lead, w.shape[0])
    else:
        y = _dense_matmul(x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if lora is not None:
        a = lora.a.astype(x.dtype)
        b = lora.b.astype(x.dtype)
        y = y + (lora.scale * ((x @ a) @ b)).astype(y.dtype)
    return y


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF LlamaRMSNorm: normalise in float32, cast back, multiply by the weight.

    Args:
      x: hidden states ``[..., D]``.
      weight: the norm weight ``[D]``.
      eps: added to the mean square.

    Returns:
      The normalised ``[..., D]`` in ``x``'s dtype.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_cos_sin(positions: jnp.ndarray, config: ModelConfig, dtype: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables ``[..., head_dim]`` for integer ``positions`` (float32 math, then ``dtype``).

    Args:
      positions: int positions of any shape (``[b, s]`` in the model).
      config: the model config (see :meth:`ModelConfig.inv_freq`).
      dtype: dtype of the tables.

    Returns:
      ``(cos, sin)``, each ``positions.shape + (head_dim,)``.
    """
    inv = jnp.asarray(config.inv_freq(), jnp.float32)
    freqs = positions[..., None].astype(jnp.float32) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE (HF convention) on ``x [b, s, heads, head_dim]``; cos/sin ``[b, s, head_dim]``.

    Args:
      x: queries or keys ``[b, s, heads, head_dim]``.
      cos: cosine table ``[b, s, head_dim]`` (:func:`rope_cos_sin`).
      sin: sine table ``[b, s, head_dim]``.

    Returns:
      The rotated ``x``, same shape.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask_matrix(
    seq_len: int, attention_mask: jnp.ndarray | None = None, window: int | None = None
) -> jnp.ndarray:
    """Boolean ``[b or 1, q, k]``: causal, optionally windowed, keys masked where padding.

    Args:
      seq_len: s, the number of queries and keys.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding, or None.
      window: sliding window in tokens (a query sees itself and the ``window - 1`` keys
        before it), or None for full causal attention.

    Returns:
      ``[b, s, s]`` with ``attention_mask``, else ``[1, s, s]``; True where a query may
      attend to a key.
    """
    q = jnp.arange(seq_len)[:, None]
    k = jnp.arange(seq_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    return allowed


def _lora_for(lora: Lora | None, name: str) -> Lora | None:
    return None if lora is None else lora.get(name)


def _check_positions(positions: jnp.ndarray | None, b: int, s: int) -> jnp.ndarray:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    return jnp.broadcast_to(positions, (b, s))


def attention(
    layer_params: Mapping[str, Any],
    x: jnp.ndarray,
    config: ModelConfig,
    *,
    cos: jnp.ndarray,
    sin: jnp.ndarray,
    mask: jnp.ndarray,
    lora: Lora | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Grouped-query self-attention of one layer on normalised input ``x [b, s, D]``.

    Args:
      layer_params: that layer's dict.
      x: normalised hidden states ``[b, s, D]``.
      config: the model config.
      cos, sin: RoPE tables ``[b, s, head_dim]``.
      mask: boolean ``[b or 1, s, s]`` (True where a query may attend to a key).
      lora: that layer's :class:`~apiq_jax.lora.Lora` or None.
      backend: qmatmul backend of quantized linears.

    Returns:
      The attention block's output ``[b, s, D]`` (after o_proj).
    """
    p = layer_params
    b, s, _ = x.shape
    h, kvh, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name: str) -> jnp.ndarray:
        return linear(x, p[name], _lora_for(lora, name), bias=p.get(f"{name}_bias"), backend=backend)

    q = apply_rope(proj("q_proj").reshape(b, s, h, hd), cos, sin)
    k = apply_rope(proj("k_proj").reshape(b, s, kvh, hd), cos, sin)
    v = proj("v_proj").reshape(b, s, kvh, hd)
    q = q.reshape(b, s, kvh, config.num_kv_groups, hd)  # query head i uses kv head i // groups
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32).astype(x.dtype)
    out = out.reshape(b, s, h * hd)
    return linear(out, p["o_proj"], _lora_for(lora, "o_proj"), bias=p.get("o_proj_bias"), backend=backend)


def mlp(
    layer_params: Mapping[str, Any],
    x: jnp.ndarray,
    *,
    lora: Lora | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` of one layer; ``lora``: that layer's Lora or None.

    Args:
      layer_params: that layer's dict.
      x: normalised hidden states ``[..., D]``.
      lora: that layer's :class:`~apiq_jax.lora.Lora` or None.
      backend: qmatmul backend of quantized linears.

    Returns:
      ``[..., D]`` in ``x``'s dtype.
    """
    p = layer_params

    def proj(name: str, inp: jnp.ndarray) -> jnp.ndarray:
        return linear(inp, p[name], _lora_for(lora, name), bias=p.get(f"{name}_bias"), backend=backend)

    return proj("down_proj", jax.nn.silu(proj("gate_proj", x)) * proj("up_proj", x))


# --- public functional core ---------------------------------------------------------------
def embed(params: Mapping[str, Any], ids: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """Token embeddings ``[b, s, D]`` of int ids ``[b, s]`` (in the embedding's dtype).

    Args:
      params: the model params (a QuantizedTensor ``embed_tokens`` is dequantized).
      ids: int token ids ``[b, s]`` (not range-checked here).
      config: the model config (unused; kept for a uniform signature).

    Returns:
      The embeddings ``[b, s, D]``.
    """
    table = params["embed_tokens"]
    if isinstance(table, QuantizedTensor):
        table = dequantize(table)
    return jnp.take(table, ids, axis=0)


def block_forward(
    layer_params: Mapping[str, Any],
    x: jnp.ndarray,
    config: ModelConfig,
    *,
    lora: Lora | None = None,
    positions: jnp.ndarray | None = None,
    attention_mask: jnp.ndarray | None = None,
    layer_idx: int | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """One decoder layer: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``.

    Args:
      layer_params: that layer's dict (linear leaves dense or QuantizedTensor).
      x: hidden states ``[b, s, D]``.
      config: the model config (static).
      lora: that layer's :class:`~apiq_jax.lora.Lora` (``lora["layers"][i]``) or None.
      positions: int positions ``[b, s]`` or ``[s]``; default ``arange(s)``.
      attention_mask: ``[b, s]`` with 1 for real tokens and 0 for padding (keys that are
        padding are never attended to), or None.
      layer_idx: needed only for configs that mix full and sliding-window layers.
      backend: qmatmul backend of quantized linears.

    Returns:
      The block's output hidden states ``[b, s, D]``.
    """
    b, s, _ = x.shape
    pos = _check_positions(positions, b, s)
    cos, sin = rope_cos_sin(pos, config, x.dtype)
    mask = attention_mask_matrix(s, attention_mask, config.attention_window(layer_idx))
    return _block(layer_params, x, config, lora, cos, sin, mask, backend)


def _block(p, x, config, lora, cos, sin, mask, backend):
    h = rms_norm(x, p["input_layernorm"], config.rms_norm_eps)
    x = x + attention(p, h, config, cos=cos, sin=sin, mask=mask, lora=lora, backend=backend)
    h = rms_norm(x, p["post_attention_layernorm"], config.rms_norm_eps)
    return x + mlp(p, h, lora=lora, backend=backend)


def final_logits(
    params: Mapping[str, Any], x: jnp.ndarray, config: ModelConfig, *, backend: str | None = None
) -> jnp.ndarray:
    """Final RMSNorm and output head (the embedding matrix when tied): ``[b, s, V]``.

    Args:
      params: the model params.
      x: the last block's output ``[b, s, D]``.
      config: the model config.
      backend: qmatmul backend of a quantized head.

    Returns:
      Logits ``[b, s, V]`` in ``x``'s dtype.
    """
    h = rms_norm(x, params["norm"], config.rms_norm_eps)
    head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return linear(h, head, backend=backend)


def _layer_lora(lora: Lora | None, i: int) -> Lora | None:
    if lora is None:
        return None
    if not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora or None, got {type(lora).__name__}")
    return lora["layers"][i]


def _run_blocks(params, lora, x, config, positions, attention_mask, collect, backend):
    b, s, _ = x.shape
    pos = _check_positions(positions, b, s)
    cos, sin = rope_cos_sin(pos, config, x.dtype)
    masks: dict[int | None, jnp.ndarray] = {}
    outs = []
    for i, layer in enumerate(params["layers"]):
        window = config.attention_window(i)
        if window not in masks:
            masks[window] = attention_mask_matrix(s, attention_mask, window)
        x = _block(layer, x, config, _layer_lora(lora, i), cos, sin, masks[window], backend)
        if collect:
            outs.append(x)
    return x, outs


def forward(
    params: Mapping[str, Any],
    lora: Lora | None,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` of int ids ``[b, s]``.

    Args:
      params: the model params (dense or frozen).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      ids: int token ids ``[b, s]``.
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)`` (as transformers without ``position_ids``).
      backend: qmatmul backend of quantized linears.

    Returns:
      Logits ``[b, s, vocab]`` in the params' dtype.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None.
    """
    x = embed(params, ids, config)
    return forward_embeddings(params, lora, x, config, attention_mask=attention_mask, positions=positions,
                              backend=backend)


def forward_embeddings(
    params: Mapping[str, Any],
    lora: Lora | None,
    x: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` from input embeddings ``x [b, s, D]`` instead of ids.

    The entry point for methods that edit the input sequence (prompt tuning prepends
    learned vectors); otherwise identical to :func:`forward` (same arguments).

    Args:
      params: the model params (dense or frozen).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      x: input embeddings ``[b, s, D]``.
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)``.
      backend: qmatmul backend of quantized linears.

    Returns:
      Logits ``[b, s, V]`` in ``x``'s dtype.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None.
    """
    x, _ = _run_blocks(params, lora, x, config, positions, attention_mask, False, backend)
    return final_logits(params, x, config, backend=backend)


def block_outputs(
    params: Mapping[str, Any],
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    lora: Lora | None = None,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
) -> list[jnp.ndarray]:
    """Output hidden states ``[b, s, D]`` of every decoder block, in order (before the final norm).

    Args:
      params: the model params (dense or frozen).
      ids: int token ids ``[b, s]``.
      config: the model config.
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)``.
      backend: qmatmul backend of quantized linears.

    Returns:
      One ``[b, s, D]`` array per decoder block.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None.
    """
    x = embed(params, ids, config)
    _, outs = _run_blocks(params, lora, x, config, positions, attention_mask, True, backend)
    return outs


_forward_jit = jax.jit(forward, static_argnames=("config", "backend"))
_block_outputs_jit = jax.jit(block_outputs, static_argnames=("config", "backend"))


# --- Flax NNX facade ----------------------------------------------------------------------
class QuantizedWeight(nnx.Variable):
    """NNX variable holding a frozen :class:`QuantizedTensor` (never a Param)."""


def _wrap(params: Params) -> Any:
    def wrap(leaf: Any) -> nnx.Variable:
        return QuantizedWeight(leaf) if isinstance(leaf, QuantizedTensor) else nnx.Param(leaf)

    return jax.tree.map(wrap, params, is_leaf=is_quantized)


class LlamaForCausalLM(nnx.Module):
    """Flax NNX module around the functional core.

    Holds the parameters as ``nnx.Param`` (dense arrays) or :class:`QuantizedWeight`
    variables under ``.weights`` (same nesting as the pure params). Calling it on int ids
    ``[batch, seq]`` returns logits ``[batch, seq, vocab]`` via the jitted :func:`forward`.

    Args:
      config: the model config.
      params: the pure params pytree; random (:func:`init_params`) when None.
      rngs: used for random init only.
      dtype: dtype of random init.
      hf_config: optional ``transformers`` config kept for faithful saving.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        dtype: Any = jnp.float32,
        hf_config: Any = None,
    ) -> None:
        if params is None:
            key = (rngs if rngs is not None else nnx.Rngs(0)).params()
            params = init_params(config, key, dtype)
        check_params(params, config)
        params = {k: v for k, v in params.items() if not (k == "lm_head" and v is None)}
        self.config = config
        self.hf_config = nnx.static(hf_config) if hasattr(nnx, "static") else hf_config
        self.weights = nnx.data(_wrap(params))

    @property
    def params(self) -> Params:
        """The pure params pytree (the arrays themselves, not copies)."""
        return jax.tree.map(
            lambda v: v.get_value(), self.weights, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    def to_params(self) -> Params:
        """Same as :attr:`params`.

        Returns:
          The pure params pytree.
        """
        return self.params

    @property
    def dtype(self) -> Any:
        """Dtype of the embedding table (the compute dtype)."""
        return self.params["embed_tokens"].dtype

    def __call__(
        self,
        ids: jnp.ndarray,
        *,
        attention_mask: jnp.ndarray | None = None,
        lora: Lora | None = None,
        backend: str | None = None,
    ) -> jnp.ndarray:
        """Logits ``[batch, seq, vocab]`` of int ids (see :func:`forward` for the arguments)."""
        ids = validate_ids(ids, self.config.vocab_size)
        return _forward_jit(
            self.params, lora, ids, self.config, attention_mask=attention_mask, backend=backend or default_backend()
        )


def validate_ids(ids: Any, vocab_size: int) -> jnp.ndarray:
    """Check int token ids ``[batch, seq]`` lie in ``[0, vocab_size)``; return them as int32.

    Args:
      ids: token ids ``[batch, seq]`` (tracers pass unchecked).
      vocab_size: the model's vocabulary size.

    Returns:
      The ids as an int32 jax array.

    Raises:
      ValueError: ids that are not 2-D, not integers or out of range, naming the
        offending value (see :func:`apiq_jax.data.check_ids`).
    """
    if isinstance(ids, jax.core.Tracer):
        return ids
    arr = np.asarray(ids)
    if arr.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, seq], got shape {arr.shape}")
    return jnp.asarray(check_ids(arr, vocab_size), jnp.int32)


__all__: Sequence[str] = [
    "LINEARS", "LlamaForCausalLM", "QuantizedWeight", "apply_rope", "attention", "block_forward",
    "block_outputs", "check_params", "embed", "final_logits", "flatten_params",
    "forward", "init_params", "layer_param_shapes", "linear", "linear_shapes", "mlp",
    "param_shapes", "rms_norm", "rope_cos_sin", "unflatten_params", "validate_ids",
]
