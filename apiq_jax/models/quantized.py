"""Quantized form of a model: ``frozen`` params (QuantizedTensor linears) + a ``lora`` tree.

``frozen`` has the same layout as the dense params, with every targeted linear replaced
by a :class:`~apiq_jax.quant.QuantizedTensor` (packed integer codes + constants) and the
norms, embeddings and head untouched. :func:`apply` is the jitted forward
``apply(frozen, lora, ids) -> logits``; it stops gradients at ``frozen`` so that
``jax.grad`` only ever differentiates the LoRA tree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.lora import LINEARS, Lora, LoraConfig, init_lora, lora_from_factors, normalize_targets
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import Params, forward, is_quantized
from apiq_jax.qmatmul import default_backend
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize, quantize

# one compilation per (shape, config) instead of op-by-op dispatch; finiteness is checked
# by quantize_weight because quantize skips that check under tracing
_quantize_jit = jax.jit(quantize, static_argnames=("cfg",))


def quantize_weight(w: jnp.ndarray, quant_config: QuantConfig, clip: Any = None, *, name: str = "weight") -> QuantizedTensor:
    """:func:`apiq_jax.quant.quantize` compiled once per (shape, config), for loops over many weights.

    The same codes as the eager call (the quantizer is bit-identical under ``jit``); the
    finiteness check that tracing skips is made here first.

    Args:
      w: a dense ``[out, in]`` weight.
      quant_config: the quantizer.
      clip: optional :class:`~apiq_jax.quant.ClipLogits`.
      name: how the error names the weight (e.g. ``"layers.3.q_proj"``).

    Returns:
      The :class:`~apiq_jax.quant.QuantizedTensor`.

    Raises:
      ValueError: a weight with NaN or inf, naming it.
    """
    if not bool(jnp.all(jnp.isfinite(w))):  # on the device; the host sees the weight only when it is bad
        bad = ~np.isfinite(np.asarray(w, np.float32))
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: weight contains {int(bad.sum())} non-finite value(s) (first at index {first}); "
                         "quantization needs finite weights")
    return _quantize_jit(w, quant_config, clip=clip)


def quantize_params(
    params: Mapping[str, Any],
    quant_config: QuantConfig,
    *,
    targets: str | Sequence[str] = LINEARS,
    clips: Mapping[str, Any] | None = None,
) -> Params:
    """Replace every targeted linear of ``params`` by a QuantizedTensor (RTN, or with clip logits).

    Args:
      params: dense params pytree (weights ``[out, in]``; groups run along ``in``).
      quant_config: bits, group size, scheme, ...
      targets: linears to quantize in every layer (default all seven).
      clips: optional clipping logits in the shape calibration returns them
        (``CalibrationResult.extras["clip"]``): ``{"layers": [{name: ClipLogits}]}``, each
        ``[out, n_groups]``; a linear without an entry is plain RTN.

    Returns:
      ``frozen``: same structure, norms/embeddings/head unchanged (shared).

    Raises:
      ValueError: an unknown target, a layer without a targeted linear, a targeted linear
        that is already quantized or not finite, or clip logits for a linear that is not
        quantized.
    """
    names = normalize_targets(targets)
    layers = params["layers"]
    clip_layers = list((clips or {"layers": []})["layers"])
    if len(clip_layers) > len(layers):
        raise ValueError(f"clip logits for {len(clip_layers)} layers; params have {len(layers)}")
    clip_layers += [{}] * (len(layers) - len(clip_layers))
    new_layers = []
    for i, layer in enumerate(layers):
        new = dict(layer)
        unknown = sorted(set(clip_layers[i]) - set(names))
        if unknown:
            raise ValueError(f"clip logits given for linears that are not quantized: {[f'layers.{i}.{n}' for n in unknown]}")
        for name in names:
            if name not in layer:
                raise ValueError(f"layers.{i} has no linear {name!r}; present: {sorted(layer)}")
            w = layer[name]
            if is_quantized(w):
                raise ValueError(f"layers.{i}.{name} is already quantized")
            new[name] = quantize_weight(w, quant_config, clip_layers[i].get(name), name=f"layers.{i}.{name}")
        new_layers.append(new)
    frozen = dict(params)
    frozen["layers"] = new_layers
    return frozen


def dequantize_params(frozen: Mapping[str, Any]) -> Params:
    """Dense params with every QuantizedTensor replaced by its dequantized weight.

    Args:
      frozen: params whose leaves may be QuantizedTensors (storage layout).

    Returns:
      The params with dense leaves only (the other leaves shared, not copied).
    """
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, dict(frozen), is_leaf=is_quantized)


def quantize_model(
    params: Mapping[str, Any],
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array | None = None,
    init: str = "qlora",
    factors: Mapping[str, Any] | None = None,
    targets: str | Sequence[str] | None = None,
) -> tuple[Params, Lora]:
    """``(frozen, lora)`` from dense params: RTN-quantize the targets and initialise LoRA.

    ``init="qlora"``: ``a`` kaiming-uniform (bound ``1/sqrt(in)``), ``b = 0`` (needs ``key``).
    ``init="factors"``: take ``factors`` (see :func:`apiq_jax.lora.lora_from_factors`).
    ``targets`` defaults to ``lora_config.targets``.

    Args:
      params: dense params pytree.
      quant_config: bits, group size, scheme, ...
      lora_config: rank, alpha and targets of the LoRA.
      key: a jax PRNG key (required for ``init="qlora"``).
      init: ``"qlora"`` or ``"factors"``.
      factors: the LoRA factors for ``init="factors"``.
      targets: linears to quantize (default ``lora_config.targets``).

    Returns:
      ``(frozen, lora)``: the params with QuantizedTensor targets, and a
      :class:`~apiq_jax.lora.Lora` (float32 factors).

    Raises:
      ValueError: an unknown ``init``, ``"qlora"`` without ``key``, ``"factors"`` without
        ``factors``, and the errors of :func:`quantize_params` and
        :func:`~apiq_jax.lora.lora_from_factors`.
    """
    if init not in ("qlora", "factors"):  # checked before the (long) quantization pass
        raise ValueError(f"init={init!r} is not supported; accepted: ('qlora', 'factors')")
    if init == "qlora" and key is None:
        raise ValueError("init='qlora' needs key= (a jax.random key) for the LoRA 'a' factors")
    if init == "factors" and factors is None:
        raise ValueError("init='factors' needs factors=")
    frozen = quantize_params(params, quant_config, targets=targets or lora_config.targets)
    if init == "qlora":
        return frozen, init_lora(frozen, lora_config, key, method="qlora")
    return frozen, lora_from_factors(frozen, lora_config, factors)


def _apply(
    frozen: Mapping[str, Any],
    lora: Lora | None,
    ids: jnp.ndarray,
    config: ModelConfig,
    attention_mask: jnp.ndarray | None,
    backend: str,
) -> jnp.ndarray:
    frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
    return forward(frozen, lora, ids, config, attention_mask=attention_mask, backend=backend)


_apply_jit = jax.jit(_apply, static_argnames=("config", "backend"))


def apply(
    frozen: Mapping[str, Any],
    lora: Lora | None,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    backend: str | None = None,
) -> jnp.ndarray:
    """Jitted logits ``[b, s, V]`` of the quantized model with LoRA.

    Every targeted linear computes ``x @ W_hat.T + lora.scale * (x @ a) @ b``. ``frozen``
    is wrapped in ``stop_gradient``: differentiate with respect to ``lora`` only, e.g.
    ``jax.grad(lambda l: loss(apply(frozen, l, ids, cfg)))(lora)``.

    Args:
      frozen: params with QuantizedTensor linears (from :func:`quantize_model` or a calibration method).
      lora: the model's :class:`~apiq_jax.lora.Lora`, or None.
      ids: int token ids ``[b, s]``.
      config: the model config.
      attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
      backend: qmatmul backend ("auto", "pallas", "xla", "interpret"); None reads
        ``$APIQ_QMATMUL_BACKEND`` (default "auto").

    Returns:
      Logits ``[b, s, vocab]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from apiq_jax import LoraConfig, ModelConfig, QuantConfig, quantize_model, apply
      >>> from apiq_jax.models import init_params
      >>> cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64,
      ...                   intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
      ...                   num_key_value_heads=2, head_dim=16)
      >>> params = init_params(cfg, jax.random.key(0))
      >>> frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=32), LoraConfig(rank=4),
      ...                               key=jax.random.key(1))
      >>> apply(frozen, lora, jnp.zeros((1, 5), jnp.int32), cfg).shape
      (1, 5, 32)
    """
    return _apply_jit(frozen, lora, ids, config, attention_mask, backend or default_backend())


def quantized_linear_names(frozen: Mapping[str, Any]) -> list[str]:
    """Flat names (``"layers.0.q_proj"``) of the QuantizedTensor leaves of ``frozen``.

    Args:
      frozen: a params pytree.

    Returns:
      The names, in traversal order.
    """
    from apiq_jax.models.llama import flatten_params

    return [k for k, v in flatten_params(frozen).items() if isinstance(v, QuantizedTensor)]
