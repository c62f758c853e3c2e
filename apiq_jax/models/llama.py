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

Stacked layers: :func:`stack_layers` turns the ``"layers"`` list into one dict of arrays
with a leading layer axis (QuantizedTensor children stacked too; the same for a
:class:`~apiq_jax.lora.Lora` with :meth:`~apiq_jax.lora.Lora.stack_layers`), and the
entry points (:func:`forward`, :func:`hidden_states`, ...) run stacked params as one
``lax.scan`` over depth; a ``"layers"`` list still runs unrolled. Memory knobs of the entry
points: ``remat`` (:data:`REMAT_POLICIES`, ``jax.checkpoint`` per block or group of
blocks) and ``attention_impl`` (:data:`ATTENTION_IMPLS`: query blocks, so attention is
not ``O(s^2)`` in memory). 16-bit activations compute their matmuls with float32
accumulation and 16-bit operands in both passes.

The functions here are the single implementation of the math; :class:`LlamaForCausalLM`
(Flax NNX) and the calibration code call them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apiq_jax.cpu_kernels import attention as cpu_attention
from apiq_jax.data import check_ids
from apiq_jax.lora import LINEARS, MLP_LINEARS, Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.qmatmul import default_backend, dense_operand, qmatmul, resolve_backend
from apiq_jax.quant import FakeQuantWeight, QuantizedTensor, dequantize, fake_quant_matmul
from apiq_jax.sharding import gather_layer

NORMS = ("input_layernorm", "post_attention_layernorm")
#: ``attention(impl=...)``: "auto" (the fused CPU kernel where it applies, else causal blocks
#: while the scores fit in one chunk, chunked beyond), "plain" (all scores at once), "blocks"
#: (causal query blocks), "chunked", "fused" (:mod:`apiq_jax.cpu_kernels.attention`)
ATTENTION_IMPLS = ("auto", "plain", "blocks", "chunked", "fused")
#: at most this many query blocks in the causal-blocks attention path
ATTENTION_CAUSAL_BLOCKS = 8
#: fewest query rows per causal block (shorter sequences run as fewer blocks)
ATTENTION_CAUSAL_MIN_ROWS = 64
#: the chunked attention path holds at most this many float32 scores per query block
ATTENTION_CHUNK_SCORES = 2**22
#: fewest query rows per block of the chunked attention path
ATTENTION_MIN_ROWS = 64
#: ``remat=``: what the decoder blocks keep for the backward pass. "none": every
#: intermediate; "block": only each block's input (the block is recomputed);
#: "dots": also the outputs of the matmuls without batch dimensions (the linears);
#: "sqrt": only the input of every g-th block (g ~ sqrt(layers), :func:`sqrt_group_size`;
#: the blocks of a group are recomputed twice)
REMAT_POLICIES = ("none", "block", "dots", "sqrt")

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
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum16(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum16_fwd(spec, a, b):
    return _einsum16(spec, a, b), (a, b)


def _einsum16_bwd(spec, res, ct):
    a, b = res
    (sa, sb), so = spec.split("->")[0].split(","), spec.split("->")[1]
    ct = ct.astype(a.dtype)  # 16-bit cotangent: the transposed dots read 16-bit operands too
    da = jnp.einsum(f"{so},{sb}->{sa}", ct, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{so},{sa}->{sb}", ct, a, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_einsum16.defvjp(_einsum16_fwd, _einsum16_bwd)


def _einsum32(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``jnp.einsum(spec, a, b)`` accumulated and returned in float32 (``b`` cast to ``a``'s dtype).

    float32 operands: plain ``jnp.einsum``. 16-bit operands: the same forward, with a VJP
    whose transposed products take the cotangent in the operands' 16-bit dtype (rather
    than float32, which makes XLA convert the other operand, e.g. a whole weight, to
    float32) and still accumulate in float32. Each index of ``spec``'s operands must
    appear in another operand or the output (plain contractions and batch indices).
    """
    b = b.astype(a.dtype)
    if a.dtype == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _einsum16(spec, a, b)


@jax.custom_vjp
def _matmul_wt(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x [m, in] @ w[out, in]^T`` in float32, with autodiff's VJP written out.

    ``dw = g^T x`` (needed when the weight is trained, e.g. fake-quantized in ApiQ
    calibration) as an explicit product: XLA's CPU backend otherwise transposes the
    ``[m, out]`` cotangent for it, as for the LoRA products (:func:`_lora_matmuls`). Unused
    cotangents (a frozen weight) are removed by XLA's dead-code elimination.
    """
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def _matmul_wt_fwd(x, w):
    return _matmul_wt(x, w), (x, w)


def _matmul_wt_bwd(res, g):
    x, w = res
    return g @ w, g.T @ x


_matmul_wt.defvjp(_matmul_wt_fwd, _matmul_wt_bwd)


def _dense_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x @ w.T`` for ``w`` in ``[out, in]`` layout, accumulated in float32, in ``x``'s dtype."""
    lead = x.shape[:-1]
    if x.dtype != jnp.float32:
        y = _einsum32("mi,oi->mo", x.reshape(-1, x.shape[-1]), w)
        return y.astype(x.dtype).reshape(*lead, w.shape[0])
    return _matmul_wt(x.reshape(-1, x.shape[-1]), w.astype(x.dtype)).reshape(*lead, w.shape[0])


def _dot32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _lora_matmuls(x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``(x @ a) @ b`` of ``x [m, in]``, ``a [in, r]``, ``b [r, out]`` (one dtype), float32 out.

    The hand-written VJP is autodiff's, made explicit: XLA's CPU backend otherwise lays
    out ``db = xa^T g`` by transposing the ``[m, out]`` cotangent (and recomputing its
    elementwise producers in that transposed order), about 30% of a small model's
    finetuning step (``benchmarks/finetune_speed.py``). Products accumulate in float32;
    16-bit operands keep the cotangent 16-bit, as :func:`_einsum32` does.
    """
    return _dot32(_dot32(x, a).astype(x.dtype), b)


def _lora_matmuls_fwd(x, a, b):
    xa = _dot32(x, a).astype(x.dtype)
    return _dot32(xa, b), (x, a, b, xa)


def _lora_matmuls_bwd(res, g):
    x, a, b, xa = res
    g = g.astype(x.dtype)
    if x.dtype != jnp.float32:  # 16-bit: products in the forms XLA's CPU backend runs in 16 bits
        gxa = _dot_nt32(g, b).astype(x.dtype)
        return (_dot_nt32(gxa, a).astype(x.dtype), _dot_tn32(gxa, x).astype(a.dtype).T,
                _dot_tn32(xa, g).astype(b.dtype))
    gxa = _dot32(g, b.T).astype(x.dtype)
    return _dot32(gxa, a.T).astype(x.dtype), _dot32(x.T, gxa).astype(a.dtype), _dot32(xa.T, g).astype(b.dtype)


def _dot_nt32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``a [m, k] @ b [n, k]^T`` accumulated in float32, ``b`` read in its own layout.

    (``a @ b.T`` gives XLA a transposed operand layout, which its CPU backend does not
    multiply in 16 bits: it converts both operands to float32 copies first.)
    """
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn32(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """``p [m, r]^T @ q [m, n]`` accumulated in float32, for a 16-bit ``p`` with few columns.

    XLA's CPU backend runs a product contracting the leading dimension of both operands
    in float32 (converting both, e.g. a whole ``[m, n]`` activation, to float32 copies).
    With the ``m`` rows split in two, the compiler instead transposes ``p`` (small) into a
    16-bit ``[r, m]`` copy and multiplies in 16 bits (float32 accumulation).
    """
    m = p.shape[0]
    # (Transpose the result only after a cast: XLA rewrites a transpose of the product itself
    # into a product its CPU backend then fails to run in 16 bits.)
    if m % 2:
        return jax.lax.dot_general(p, q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.einsum("kmr,kmn->rn", p.reshape(2, m // 2, -1), q.reshape(2, m // 2, -1),
                      preferred_element_type=jnp.float32)


_lora_matmuls.defvjp(_lora_matmuls_fwd, _lora_matmuls_bwd)


def _lora_term(x: jnp.ndarray, lora: Lora) -> jnp.ndarray:
    """``lora.scale * (x @ a) @ b`` in ``x``'s dtype (float32 accumulation)."""
    lead = x.shape[:-1]
    y = _lora_matmuls(x.reshape(-1, x.shape[-1]), lora.a.astype(x.dtype), lora.b.astype(x.dtype))
    return (lora.scale * y).astype(x.dtype).reshape(*lead, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qlora16(x: jnp.ndarray, qt: QuantizedTensor, a: jnp.ndarray, b: jnp.ndarray, scale: float) -> jnp.ndarray:
    """``x @ W^T + scale * (x @ a) @ b`` of a 16-bit ``x [m, in]`` and quantized ``W``, in ``x``'s dtype.

    The XLA backend's 16-bit path of :func:`linear` with a LoRA: the base product and
    the LoRA product are one dot, ``[x, s] @ [W, b^T]^T`` with ``s = scale * (x @ a)``
    rounded to 16 bits (float32 accumulation), so XLA's CPU backend, whose 16-bit dots
    produce float32, holds one float32 ``[m, out]`` result instead of two (the LoRA
    term's and the base product's, alive together until their sum). The backward pass
    does the same for ``dx = [g, g_s] @ [W; a^T]``; like :func:`apiq_jax.qmatmul.xla_matmul`
    it keeps no dense weight (``W`` is dequantized again from the codes), and ``W`` gets
    no gradient.
    """
    return _qlora16_fwd(x, qt, a, b, scale)[0]


def _qlora16_fwd(x, qt, a, b, scale):
    w = dense_operand(qt, x.dtype)  # [out, in rounded up to whole groups]
    xs = (scale * _dot32(x, a)).astype(x.dtype)
    lhs = jnp.concatenate([jnp.pad(x, ((0, 0), (0, w.shape[1] - x.shape[1]))), xs], axis=1)
    y = _dot_nt32(lhs, jnp.concatenate([w, b.T], axis=1)).astype(x.dtype)
    return y, (x, qt, a, b, xs)


def _qlora16_bwd(scale, res, g):
    x, qt, a, b, xs = res
    g = g.astype(x.dtype)
    w = dense_operand(qt, x.dtype)  # recomputed from the codes
    gs = (scale * _dot_nt32(g, b)).astype(x.dtype)  # cotangent of x @ a
    at = jnp.pad(a.T, ((0, 0), (0, w.shape[1] - x.shape[1])))
    dx = _dot32(jnp.concatenate([g, gs], axis=1), jnp.concatenate([w, at], axis=0))[:, : x.shape[1]]
    return dx.astype(x.dtype), None, _dot_tn32(gs, x).astype(a.dtype).T, _dot_tn32(xs, g).astype(b.dtype)


_qlora16.defvjp(_qlora16_fwd, _qlora16_bwd)


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
      w: a dense ``[out, in]`` array, a QuantizedTensor (storage or kernel layout; routed
        to :func:`apiq_jax.qmatmul.qmatmul`: Pallas kernels on GPU/TPU, fused XLA
        dequant-matmul on CPU) or a :class:`~apiq_jax.quant.FakeQuantWeight` (quantized
        where used, :func:`~apiq_jax.quant.fake_quant_matmul`, float32).
      lora: the linear's one-linear :class:`~apiq_jax.lora.Lora`, or None.
      bias: optional ``[out]`` bias.
      backend: qmatmul backend for a quantized ``w`` (None: the default).

    Returns:
      ``[..., out]`` in ``x``'s dtype. A 16-bit ``x`` with a quantized ``w`` and a LoRA on
      the XLA backend runs as one dot (:func:`_qlora16`).
    """
    if isinstance(w, QuantizedTensor) and lora is not None and x.dtype != jnp.float32 and (
            resolve_backend(backend) == "xla"):
        lead = x.shape[:-1]
        y = _qlora16(x.reshape(-1, x.shape[-1]), w, lora.a.astype(x.dtype), lora.b.astype(x.dtype), lora.scale)
        y = y.reshape(*lead, w.shape[0])
        return y if bias is None else y + bias.astype(y.dtype)
    if isinstance(w, QuantizedTensor):
        lead = x.shape[:-1]
        y = qmatmul(x.reshape(-1, x.shape[-1]), w, backend=backend).astype(x.dtype).reshape(*lead, w.shape[0])
    elif isinstance(w, FakeQuantWeight):
        lead = x.shape[:-1]
        y = fake_quant_matmul(x.reshape(-1, x.shape[-1]).astype(jnp.float32), w.w, w.clip, w.config,
                              w.keep_quantized)
        y = y.astype(x.dtype).reshape(*lead, w.shape[0])
    else:
        y = _dense_matmul(x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if lora is not None:
        y = y + _lora_term(x, lora).astype(y.dtype)
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


def _check_choice(value: Any, name: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {accepted}")
    return value


def _attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention of queries ``q [b, q, kvh, g, hd]`` over ``k, v [b, s, kvh, hd]``.

    ``mask`` is boolean ``[b or 1, q, s]``. Scores and softmax in float32; the output
    ``[b, q, kvh, g, hd]`` in ``q``'s dtype (:func:`_attend_heads` in head-major layout).
    """
    qh = jnp.moveaxis(q, 1, 3)  # [b, kvh, g, q, hd]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [b, kvh, s, hd]
    return jnp.moveaxis(_attend_heads(qh, kh, vh, mask), 3, 1)


def _attend_heads(qh: jnp.ndarray, kh: jnp.ndarray, vh: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """:func:`_attend` in head-major layout: ``qh [b, kvh, g, q, hd]``, ``kh, vh [b, kvh, s, hd]``.

    The ``g`` query heads of a key head are one ``[g * q, hd]`` operand of a batched
    ``[b, kvh]`` dot (large dots for XLA's CPU backend), and the softmax is normalised
    after the product with ``v`` (a division of ``[q, hd]`` values instead of ``[q, s]``);
    a row whose keys are all masked averages every value, as ``jax.nn.softmax`` of equal
    scores does.

    Returns:
      ``[b, kvh, g, q, hd]`` in ``qh``'s dtype.
    """
    b, kvh, g, nq, hd = qh.shape
    scores = _einsum32("bkqd,bksd->bkqs", qh.reshape(b, kvh, g * nq, hd), kh).reshape(b, kvh, g, nq, -1)
    scores = jnp.where(mask[:, None, None], scores * (hd**-0.5), jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = _einsum32("bkqs,bksd->bkqd", weights.astype(qh.dtype).reshape(b, kvh, g * nq, -1), vh)
    return (out.reshape(b, kvh, g, nq, hd) / total).astype(qh.dtype)


def causal_block_rows(s: int) -> int:
    """Query rows per block of the causal-blocks attention path for ``s`` tokens.

    Args:
      s: sequence length.

    Returns:
      ``ceil(s / n)`` with ``n`` blocks: at most :data:`ATTENTION_CAUSAL_BLOCKS`, each of at
      least :data:`ATTENTION_CAUSAL_MIN_ROWS` rows (``s`` itself: one block).
    """
    n = max(1, min(ATTENTION_CAUSAL_BLOCKS, s // ATTENTION_CAUSAL_MIN_ROWS))
    return -(-s // n)


def _attend_causal_blocks(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """:func:`_attend` of a causal ``mask``, one block of queries at a time over the keys it can see.

    Queries ``[lo, hi)`` attend to keys ``[0, hi)`` only: a causal mask (every mask of
    :func:`attention_mask_matrix`) hides the later keys, so their scores, about half of
    all, are never computed. Each block is a static-shape :func:`_attend` (the Python loop
    unrolls into :func:`causal_block_rows`-row blocks), whose scores are small enough to
    stay in cache on CPU: about 3-5x faster than all scores at once at 256-512 tokens
    (``benchmarks/finetune_speed.py``), with the same result up to float32 rounding.
    """
    s = q.shape[1]
    rows = causal_block_rows(s)
    qh = jnp.moveaxis(q, 1, 3)  # head-major once: [b, kvh, g, s, hd]
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    outs = [_attend_heads(qh[:, :, :, lo:lo + rows], kh[:, :, :lo + rows], vh[:, :, :lo + rows],
                          mask[:, lo:lo + rows, :lo + rows]) for lo in range(0, s, rows)]
    return jnp.moveaxis(jnp.concatenate(outs, axis=3), 3, 1)


def attention_chunk_rows(b: int, heads: int, s: int) -> int:
    """Query rows per block of the chunked attention path.

    The most rows (a power of two, at least :data:`ATTENTION_MIN_ROWS`) whose float32
    scores ``[b, heads, rows, s]`` hold at most :data:`ATTENTION_CHUNK_SCORES` values.

    Args:
      b: batch size.
      heads: query heads.
      s: sequence length (keys).

    Returns:
      The block size in query rows (``s`` or more means one block: the plain path).
    """
    rows = ATTENTION_MIN_ROWS
    while rows * 2 * b * heads * s <= ATTENTION_CHUNK_SCORES:
        rows *= 2
    return rows


def _attend_chunked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """:func:`_attend` one block of ``chunk`` queries at a time, each rematerialised.

    The query blocks run in one ``lax.scan`` (one block's scores alive at a time) whose
    body is ``jax.checkpoint``-ed (the backward pass recomputes a block's scores instead
    of keeping them), so attention holds ``[b, heads, chunk, s]`` scores instead of
    ``[b, heads, s, s]``. Every query row sees the same keys and mask as in
    :func:`_attend`: the same result up to the summation order of the dots. (The blocks
    compute the fully masked scores above the diagonal too: static shapes in the loop;
    splitting the loop by key range saved those FLOPs but cost more memory on CPU.)
    """
    b, s = q.shape[:2]
    n = -(-s // chunk)
    pad = n * chunk - s
    qc = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * (q.ndim - 2))
    qc = jnp.moveaxis(qc.reshape(b, n, chunk, *q.shape[2:]), 1, 0)
    mc = jnp.pad(jnp.broadcast_to(mask, (mask.shape[0], s, s)), ((0, 0), (0, pad), (0, 0)))
    mc = jnp.moveaxis(mc.reshape(mask.shape[0], n, chunk, s), 1, 0)
    step = jax.checkpoint(_attend)

    def body(carry, xs):
        return carry, step(xs[0], k, v, xs[1])

    _, out = jax.lax.scan(body, None, (qc, mc))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :s]


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
    impl: str = "auto",
) -> jnp.ndarray:
    """Grouped-query self-attention of one layer on normalised input ``x [b, s, D]``.

    Args:
      layer_params: that layer's dict.
      x: normalised hidden states ``[b, s, D]``.
      config: the model config.
      cos, sin: RoPE tables ``[b, s, head_dim]``.
      mask: boolean ``[b or 1, s, s]`` (True where a query may attend to a key); causal
        (:func:`attention_mask_matrix`).
      lora: that layer's :class:`~apiq_jax.lora.Lora` or None.
      backend: qmatmul backend of quantized linears.
      impl: one of :data:`ATTENTION_IMPLS`. "plain": the ``[b, heads, s, s]`` float32
        scores at once. "blocks": causal query blocks, each over the keys it can see
        (:func:`causal_block_rows`). "chunked": blocks of :func:`attention_chunk_rows`
        queries, each rematerialised in the backward pass, so attention memory is
        ``O(s * rows)`` instead of ``O(s^2)``. "fused": one C++ custom call per pass on the
        CPU (:func:`apiq_jax.cpu_kernels.fused_attention`: float32; ``O(s)`` memory; the
        fastest on CPU). "auto": "fused" where it applies, else
        "blocks" while all scores fit in one chunk of :data:`ATTENTION_CHUNK_SCORES` values,
        "chunked" beyond. All give the same values up to float32 rounding.

    Returns:
      The attention block's output ``[b, s, D]`` (after o_proj).

    Raises:
      ValueError: an unknown ``impl``, or "fused" where the kernel does not apply.
    """
    _check_choice(impl, "attention impl", ATTENTION_IMPLS)
    p = layer_params
    b, s, _ = x.shape
    h, kvh, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name: str) -> jnp.ndarray:
        return linear(x, p[name], _lora_for(lora, name), bias=p.get(f"{name}_bias"), backend=backend)

    q = apply_rope(proj("q_proj").reshape(b, s, h, hd), cos, sin)
    k = apply_rope(proj("k_proj").reshape(b, s, kvh, hd), cos, sin)
    v = proj("v_proj").reshape(b, s, kvh, hd)
    q = q.reshape(b, s, kvh, config.num_kv_groups, hd)  # query head i uses kv head i // groups
    rows = attention_chunk_rows(b, h, s)
    if impl == "fused" or (impl == "auto" and cpu_attention.supports(q, k, mask)):
        out = cpu_attention.fused_attention(q, k, v, mask)
    elif impl == "plain":
        out = _attend(q, k, v, mask)
    elif impl == "blocks" or (impl == "auto" and rows >= s):
        out = _attend_causal_blocks(q, k, v, mask)
    else:
        out = _attend_chunked(q, k, v, mask, rows)
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


def _block(p, x, config, lora, cos, sin, mask, backend, impl="auto"):
    p, lora = gather_layer((p, lora))  # FSDP: this layer's weights whole on every device, here only
    h = rms_norm(x, p["input_layernorm"], config.rms_norm_eps)
    x = x + attention(p, h, config, cos=cos, sin=sin, mask=mask, lora=lora, backend=backend, impl=impl)
    h = rms_norm(x, p["post_attention_layernorm"], config.rms_norm_eps)
    return x + mlp(p, h, lora=lora, backend=backend)


def final_logits(
    params: Mapping[str, Any], x: jnp.ndarray, config: ModelConfig, *, backend: str | None = None,
    dtype: Any = None,
) -> jnp.ndarray:
    """Final RMSNorm and output head (the embedding matrix when tied): ``[b, s, V]``.

    Args:
      params: the model params.
      x: the last block's output ``[b, s, D]`` (any leading shape ``[..., D]``).
      config: the model config.
      backend: qmatmul backend of a quantized head.
      dtype: dtype of the logits; None: ``x``'s. float32 logits of 16-bit ``x`` come from
        the float32 accumulator directly (not rounded to 16 bits first).

    Returns:
      Logits ``[b, s, V]``.
    """
    h = rms_norm(x, params["norm"], config.rms_norm_eps)
    head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    if dtype is None or jnp.dtype(dtype) == h.dtype or isinstance(head, QuantizedTensor):
        logits = linear(h, head, backend=backend)
        return logits if dtype is None else logits.astype(dtype)
    lead = h.shape[:-1]
    return _einsum32("mi,vi->mv", h.reshape(-1, h.shape[-1]), head).astype(dtype).reshape(*lead, head.shape[0])


# --- stacked layers (lax.scan over depth) -------------------------------------------------
def _is_stacked_layers(layers: Any) -> bool:
    return isinstance(layers, Mapping)


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` (params or a :class:`~apiq_jax.lora.Lora`) holds stacked layers.

    Args:
      tree: a params dict or a model-level Lora.

    Returns:
      True when ``tree["layers"]`` is one dict of arrays with a leading layer axis
      (:func:`stack_layers`), False when it is a list of per-layer dicts.
    """
    if isinstance(tree, Lora):
        return tree.is_stacked
    return isinstance(tree, Mapping) and _is_stacked_layers(tree.get("layers"))


def _describe_leaf(x: Any) -> str:
    if isinstance(x, QuantizedTensor):
        return f"a QuantizedTensor {tuple(x.shape)} ({x.config}, {x.dtype}, layout {x.layout})"
    return f"an array {tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}"


def stack_layers(params: Any) -> Any:
    """Params (or a :class:`~apiq_jax.lora.Lora`) with the ``"layers"`` list stacked into one dict.

    Every per-layer leaf becomes one array with a leading layer axis ``[L, ...]``; a
    :class:`~apiq_jax.quant.QuantizedTensor` stays a QuantizedTensor whose children are
    stacked (its static shape/config/dtype/layout are the per-layer ones, which must then
    agree across layers). :func:`forward` (and the other entry points) run stacked
    params as one ``lax.scan`` over depth: compile time and program size do not grow with
    the number of layers. Stacking copies the layer weights once (do it outside ``jit``);
    already stacked input is returned as is. :func:`unstack_layers` is the inverse.

    Args:
      params: the model params (``"layers"``: a list of per-layer dicts), or a model-level
        :class:`~apiq_jax.lora.Lora` (stacked by :meth:`~apiq_jax.lora.Lora.stack_layers`).

    Returns:
      The same tree with ``"layers"`` one dict of stacked leaves.

    Raises:
      ValueError: no ``"layers"``, or layers whose structure, leaf shapes or dtypes, or
        QuantizedTensor metadata differ (naming the first difference).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"layers": [{"w": jnp.zeros((3, 2))}, {"w": jnp.ones((3, 2))}], "norm": jnp.ones(2)}
      >>> stacked = stack_layers(params)
      >>> stacked["layers"]["w"].shape, is_stacked(stacked)
      ((2, 3, 2), True)
      >>> bool(jnp.array_equal(unstack_layers(stacked)["layers"][1]["w"], params["layers"][1]["w"]))
      True
    """
    if isinstance(params, Lora):
        return params.stack_layers()
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError("stack_layers needs a params dict with a 'layers' entry")
    layers = params["layers"]
    if _is_stacked_layers(layers):
        return params
    layers = list(layers)
    if not layers:
        raise ValueError("stack_layers: params have no layers")
    ref = flatten_params(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        flat = flatten_params(layer)
        if set(flat) != set(ref):
            raise ValueError(
                f"stack_layers: layers 0 and {i} differ in parameters {sorted(set(flat) ^ set(ref))}; "
                "layers must be alike to be stacked"
            )
        for k, v in ref.items():
            if _describe_leaf(flat[k]) != _describe_leaf(v) or jax.tree.structure(flat[k]) != jax.tree.structure(v):
                raise ValueError(
                    f"stack_layers: layers.{i}.{k} is {_describe_leaf(flat[k])} where layers.0.{k} is "
                    f"{_describe_leaf(v)}; layers must be alike to be stacked"
                )
    out = dict(params)
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: Any) -> Any:
    """Inverse of :func:`stack_layers`: the ``"layers"`` dict of stacked leaves back to a list.

    Args:
      params: params or a :class:`~apiq_jax.lora.Lora` with stacked layers (list-form input is
        returned as is).

    Returns:
      The same tree with ``"layers"`` a list of per-layer dicts.
    """
    if isinstance(params, Lora):
        return params.unstack_layers()
    layers = params.get("layers") if isinstance(params, Mapping) else None
    if not _is_stacked_layers(layers):
        return params
    n = _num_stacked(layers)
    out = dict(params)
    out["layers"] = [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]
    return out


def _num_stacked(layers: Mapping[str, Any]) -> int:
    leaves = jax.tree.leaves(layers)
    if not leaves:
        raise ValueError("stacked layers hold no arrays")
    return int(leaves[0].shape[0])


def cast_params(params: Any, dtype: Any) -> Any:
    """Every floating leaf of ``params`` in ``dtype``; QuantizedTensors dequantize to ``dtype``.

    The compute dtype of the model is the dtype of its embeddings (:func:`embed`), so
    ``forward(cast_params(params, "bfloat16"), ...)`` runs in bfloat16. Packed codes,
    scales and zero points are not touched: a QuantizedTensor only changes the dtype its
    dequantized weight is produced in. Leaves already in ``dtype`` are shared, not copied.

    Args:
      params: a params tree (list or stacked layers).
      dtype: the floating dtype ("float32", "bfloat16", "float16", or a jnp dtype).

    Returns:
      The cast tree.

    Raises:
      ValueError: ``dtype`` is not a floating dtype.
    """
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype={dtype!r} is not a floating dtype; accepted: float32, bfloat16, float16")

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, QuantizedTensor):
            return leaf if leaf.dtype == dt.name else dataclasses.replace(leaf, dtype=dt.name)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dt:
            return leaf.astype(dt)
        return leaf

    return jax.tree.map(cast, params, is_leaf=is_quantized)


def _remat(fn: Any, remat: str, **kwargs: Any) -> Any:
    """``fn`` under ``jax.checkpoint`` for "block"/"dots"/"sqrt" (the per-block part), as is for "none"."""
    if remat == "none":
        return fn
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return jax.checkpoint(fn, policy=policy, **kwargs)


def sqrt_group_size(n_layers: int) -> int:
    """Blocks per group of the "sqrt" remat policy: the divisor ``g`` of ``n_layers`` that
    minimises the block inputs kept at once, ``n_layers / g + g`` (the smaller on ties).

    Args:
      n_layers: the number of decoder layers.

    Returns:
      ``g`` (1 means plain per-block remat).
    """
    divisors = [g for g in range(1, n_layers + 1) if n_layers % g == 0]
    return min(divisors, key=lambda g: (n_layers // g + g, g))


def _layer_lora(lora: Lora | None, i: int) -> Lora | None:
    if lora is None:
        return None
    if not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora or None, got {type(lora).__name__}")
    return lora["layers"][i]


def _run_blocks(params, lora, x, config, positions, attention_mask, collect, backend, remat="none", impl="auto"):
    _check_choice(remat, "remat", REMAT_POLICIES)
    _check_choice(impl, "attention impl", ATTENTION_IMPLS)
    if lora is not None and not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora or None, got {type(lora).__name__}")
    b, s, _ = x.shape
    pos = _check_positions(positions, b, s)
    cos, sin = rope_cos_sin(pos, config, x.dtype)
    if _is_stacked_layers(params["layers"]):
        return _scan_blocks(params, lora, x, config, cos, sin, attention_mask, collect, backend, remat, impl)
    if lora is not None and lora.is_stacked:
        lora = lora.unstack_layers()
    layers = list(params["layers"])
    masks = {w: attention_mask_matrix(s, attention_mask, w)
             for w in {config.attention_window(i) for i in range(len(layers))}}
    block = _remat(_block, remat, static_argnums=(2, 7, 8))

    def run(x, first, last):  # blocks [first, last)
        outs = []
        for i in range(first, last):
            mask = masks[config.attention_window(i)]
            x = block(layers[i], x, config, _layer_lora(lora, i), cos, sin, mask, backend, impl)
            outs.append(x)
        return x, outs

    if remat != "sqrt" or collect:
        x, outs = run(x, 0, len(layers))
        return x, (outs if collect else [])
    g = sqrt_group_size(len(layers))
    for first in range(0, len(layers), g):  # each group of g blocks keeps only its input
        x = jax.checkpoint(lambda x, first=first: run(x, first, first + g)[0])(x)
    return x, []


def _scan_blocks(params, lora, x, config, cos, sin, attention_mask, collect, backend, remat, impl):
    """The decoder stack as ``lax.scan`` over stacked layers (see :func:`stack_layers`).

    "sqrt" scans over groups of :func:`sqrt_group_size` blocks (an outer checkpointed scan
    of inner per-block-checkpointed scans).
    """
    s = x.shape[1]
    layers = params["layers"]
    n = _num_stacked(layers)
    if n != config.num_hidden_layers:
        raise ValueError(f"stacked params hold {n} layers; the config has {config.num_hidden_layers}")
    if lora is not None and not lora.is_stacked:
        lora = lora.stack_layers()
    factors = None if lora is None else lora.factors["layers"]
    windows = {config.attention_window(i) for i in range(n)}
    if len(windows) == 1:  # one attention kind: the mask is a constant of the loop
        static_mask = attention_mask_matrix(s, attention_mask, windows.pop())
        per_layer = None
    else:  # mixed full / sliding layers: the window is scanned (full attention = window s)
        static_mask = None
        per_layer = jnp.asarray([config.attention_window(i) or s for i in range(n)], jnp.int32)
    consts = (cos, sin, static_mask, attention_mask)
    sixteen = x.dtype != jnp.float32

    def layer(h, p, f, window, consts):
        cos, sin, static_mask, attention_mask = consts
        mask = static_mask if window is None else attention_mask_matrix(s, attention_mask, window)
        lo = None if f is None else Lora(f, lora.config)
        return _block(p, h, config, lo, cos, sin, mask, backend, impl)

    if collect or remat == "none":
        def body(h, xs):
            h = layer(h, *xs, consts)
            return h, (h if collect else None)

        x, ys = jax.lax.scan(body, x, (layers, factors, per_layer))
        return x, ([ys[i] for i in range(n)] if collect else [])
    if remat == "dots":
        step = _remat(layer, remat, prevent_cse=False)
    else:  # "block" and the blocks inside a "sqrt" group: keep only each block's input
        step = _remat_16bit(layer) if sixteen else jax.checkpoint(layer, prevent_cse=False)

    def scan_layers(h, p, f, window, consts):
        return jax.lax.scan(lambda h, xs: (step(h, *xs, consts), None), h, (p, f, window))[0]

    g = sqrt_group_size(n) if remat == "sqrt" else 1
    if g == 1:
        return scan_layers(x, layers, factors, per_layer, consts), []
    group = _remat_16bit(scan_layers) if sixteen else jax.checkpoint(scan_layers, prevent_cse=False)
    grouped = jax.tree.map(lambda a: a.reshape(n // g, g, *a.shape[1:]), (layers, factors, per_layer))
    x, _ = jax.lax.scan(lambda h, xs: (group(h, *xs, consts), None), x, grouped)
    return x, []


def _remat_16bit(fn: Any) -> Any:
    """``fn(h, p, f, window, consts)`` rematerialised like ``jax.checkpoint``, keeping ``h`` as words.

    The backward pass recomputes ``fn`` from its input ``h`` (16-bit), the only thing kept
    per call; it is kept bit-cast to uint16 because XLA's CPU backend converts a stacked
    16-bit residual to float32 as a whole before the backward loop (doubling it). Only
    ``h`` and the LoRA factors ``f`` get gradients (``p`` is frozen; ``window`` and the
    RoPE tables and masks in ``consts`` are constants).
    """

    @jax.custom_vjp
    def run(h, p, f, window, consts):
        return fn(h, p, f, window, consts)

    def fwd(h, p, f, window, consts):
        return fn(h, p, f, window, consts), (_as_words(h), p, f, window, consts)

    def bwd(res, ct):
        words, p, f, window, consts = res
        h = _from_words(words, ct.dtype)
        _, vjp = jax.vjp(lambda h, f: fn(h, p, f, window, consts), h, f)
        dh, df = vjp(ct)
        return dh, None, df, None, None

    run.defvjp(fwd, bwd)
    return run


def _as_words(x: jnp.ndarray) -> jnp.ndarray:
    """A 16-bit float array as uint16 words (other dtypes as they are)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_words(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def hidden_states(
    params: Mapping[str, Any],
    lora: Lora | None,
    x: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
) -> jnp.ndarray:
    """The last decoder block's output ``[b, s, D]`` (before the final norm) from embeddings ``x``.

    Params with a ``"layers"`` list run the blocks unrolled (as before); stacked params
    (:func:`stack_layers`) run them as one ``lax.scan`` (a model-level ``lora`` is
    stacked or unstacked to match). ``remat`` wraps every block in ``jax.checkpoint``.

    Args:
      params: the model params (dense or frozen; list or stacked layers).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      x: input embeddings ``[b, s, D]`` (their dtype is the compute dtype).
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)``.
      backend: qmatmul backend of quantized linears.
      remat: one of :data:`REMAT_POLICIES`: what each block keeps for the backward pass
        ("none": everything, "block": its input only, "dots": also the outputs of the
        linears). Only differentiation is affected; the values are the same.
      attention_impl: one of :data:`ATTENTION_IMPLS` (see :func:`attention`).

    Returns:
      ``[b, s, D]`` in ``x``'s dtype.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None, an unknown
        ``remat`` or ``attention_impl``, or stacked params whose layer count differs from
        the config's.
    """
    x, _ = _run_blocks(params, lora, x, config, positions, attention_mask, False, backend, remat, attention_impl)
    return x


def forward(
    params: Mapping[str, Any],
    lora: Lora | None,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` of int ids ``[b, s]``.

    Args:
      params: the model params (dense or frozen; a ``"layers"`` list, or stacked layers
        run as one ``lax.scan``: :func:`stack_layers`).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      ids: int token ids ``[b, s]``.
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)`` (as transformers without ``position_ids``).
      backend: qmatmul backend of quantized linears.
      remat: per-block rematerialisation, one of :data:`REMAT_POLICIES` (see :func:`hidden_states`).
      attention_impl: one of :data:`ATTENTION_IMPLS` (see :func:`attention`).

    Returns:
      Logits ``[b, s, vocab]`` in the params' dtype.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None, or an
        unknown ``remat`` / ``attention_impl``.
    """
    x = embed(params, ids, config)
    return forward_embeddings(params, lora, x, config, attention_mask=attention_mask, positions=positions,
                              backend=backend, remat=remat, attention_impl=attention_impl)


def forward_embeddings(
    params: Mapping[str, Any],
    lora: Lora | None,
    x: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    backend: str | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
) -> jnp.ndarray:
    """Logits ``[b, s, V]`` from input embeddings ``x [b, s, D]`` instead of ids.

    The entry point for methods that edit the input sequence (prompt tuning prepends
    learned vectors); otherwise identical to :func:`forward` (same arguments).

    Args:
      params: the model params (dense or frozen; list or stacked layers).
      lora: the model's :class:`~apiq_jax.lora.Lora` or None.
      x: input embeddings ``[b, s, D]``.
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      positions: int positions; default ``arange(s)``.
      backend: qmatmul backend of quantized linears.
      remat: per-block rematerialisation (see :func:`hidden_states`).
      attention_impl: see :func:`attention`.

    Returns:
      Logits ``[b, s, V]`` in ``x``'s dtype.

    Raises:
      ValueError: ``lora`` is neither a :class:`~apiq_jax.lora.Lora` nor None, or an
        unknown ``remat`` / ``attention_impl``.
    """
    x = hidden_states(params, lora, x, config, attention_mask=attention_mask, positions=positions,
                      backend=backend, remat=remat, attention_impl=attention_impl)
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
      params: the model params (dense or frozen; list or stacked layers).
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
    "ATTENTION_CHUNK_SCORES", "ATTENTION_IMPLS", "ATTENTION_MIN_ROWS", "LINEARS", "LlamaForCausalLM", "QuantizedWeight", "REMAT_POLICIES",
    "apply_rope", "attention", "attention_chunk_rows", "block_forward", "block_outputs", "cast_params", "check_params", "embed",
    "final_logits", "flatten_params", "forward", "forward_embeddings", "hidden_states", "init_params",
    "is_stacked", "layer_param_shapes", "linear", "linear_shapes", "mlp", "param_shapes", "rms_norm",
    "rope_cos_sin", "sqrt_group_size", "stack_layers", "unflatten_params", "unstack_layers", "validate_ids",
]
