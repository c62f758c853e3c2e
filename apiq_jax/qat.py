"""Quantization-aware training (QAT): train weights and clipping through fake quantization.

Where post-training methods (RTN, GPTQ, ApiQ) fix the quantized weights from calibration
data, QAT trains the model end to end on the language-modelling loss with every targeted
linear replaced by ``fake_quantize(W; gamma, beta)`` (straight-through rounding, learnable
clipping as in ApiQ/OmniQuant). The trainable pytree holds the dense weights and clipping
logits of the targeted linears; everything else stays frozen. :func:`qat_freeze` then stores
the result bit-packed, and its dequantized weights are exactly the ones trained against::

    qcfg = QuantConfig(bits=2, group_size=64)
    trainable, rest = qat_split(params, qcfg)
    trainable, losses = finetune(rest, trainable, ids, config, cfg, loss_fn=qat_loss_fn(config, qcfg),
                                 optimizer=qat_optimizer(cfg, clip_lr=5e-3))
    frozen = qat_freeze(rest, trainable, qcfg)     # QuantizedTensor linears, no LoRA
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import LINEARS, forward, is_quantized
from apiq_jax.quant import ClipLogits, QuantConfig, fake_quantize, init_clip, quantize
from apiq_jax.training import FinetuneConfig, make_optimizer, next_token_nll

Trainable = dict[str, list[dict[str, dict[str, jnp.ndarray]]]]


def qat_split(
    params: Mapping[str, Any],
    quant_config: QuantConfig,
    targets: Sequence[str] = LINEARS,
    clip_init: float = 4.0,
) -> tuple[Trainable, dict[str, Any]]:
    """``(trainable, rest)``: the targeted dense weights (float32) with clipping logits, and the rest.

    ``trainable = {"layers": [{name: {"w", "gamma", "beta"}}]}``; ``rest`` is ``params`` with
    those weights removed (norms, embeddings, untargeted linears).

    Args:
      params: the dense model params.
      quant_config: the quantization config (its group size sets the clipping-logit shape).
      targets: the linears to train, canonical names from :data:`~apiq_jax.lora.LINEARS`
        (short aliases are not accepted here).
      clip_init: the initial clipping logit (ApiQ: 4.0, i.e. ``sigmoid(4) = 0.982`` of
        each group's range).

    Returns:
      ``(trainable, rest)``: ``w`` is the float32 copy of the weight ``[out, in]``, ``gamma``
      and ``beta`` are float32 ``[out, n_groups]``; ``rest`` shares its leaves with ``params``.

    Raises:
      ValueError: ``targets`` is empty or names an unknown linear, or a targeted weight
        is already quantized.
    """
    unknown = [t for t in targets if t not in LINEARS]
    if unknown or not targets:
        raise ValueError(f"targets {list(targets)}: accepted are non-empty subsets of {LINEARS}")
    layers_t, layers_r = [], []
    for i, layer in enumerate(params["layers"]):
        t = {}
        for name in targets:
            w = layer[name]
            if is_quantized(w):
                raise ValueError(f"layers.{i}.{name} is already quantized; QAT starts from dense weights")
            gamma, beta = init_clip(w.shape, quant_config, clip_init)
            t[name] = {"w": jnp.asarray(w, jnp.float32), "gamma": gamma, "beta": beta}
        layers_t.append(t)
        layers_r.append({k: v for k, v in layer.items() if k not in targets})
    rest = dict(params)
    rest["layers"] = layers_r
    return {"layers": layers_t}, rest


def _merge(rest: Mapping[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rest)
    out["layers"] = [{**r, **t} for r, t in zip(rest["layers"], layers)]
    return out


def qat_params(rest: Mapping[str, Any], trainable: Trainable, quant_config: QuantConfig) -> dict[str, Any]:
    """The model params with every trained linear fake-quantized (differentiable, STE).

    Args:
      rest: the params without the trained linears (from :func:`qat_split`).
      trainable: ``{"layers": [{name: {"w", "gamma", "beta"}}]}`` (from :func:`qat_split`).
      quant_config: the quantization config.

    Returns:
      The full params; each trained linear is ``fake_quantize(w)`` (float32 ``[out, in]``),
      differentiable with respect to ``w``, ``gamma`` and ``beta``.
    """
    layers = [{n: fake_quantize(p["w"], quant_config, clip=ClipLogits(p["gamma"], p["beta"])) for n, p in lt.items()}
              for lt in trainable["layers"]]
    return _merge(rest, layers)


def qat_loss_fn(
    config: ModelConfig, quant_config: QuantConfig
) -> Callable[[Mapping[str, Any], Trainable, jnp.ndarray], jnp.ndarray]:
    """``loss(rest, trainable, ids)``: next-token NLL of the fake-quantized model.

    Args:
      config: the model config.
      quant_config: the quantization config of the fake quantization.

    Returns:
      ``loss(rest, trainable, ids)`` returning the mean next-token NLL (float32 scalar), for
      ``finetune(..., loss_fn=...)``; gradients are stopped at ``rest``.
    """

    def loss(rest: Mapping[str, Any], trainable: Trainable, ids: jnp.ndarray) -> jnp.ndarray:
        rest = jax.tree.map(jax.lax.stop_gradient, rest)
        return next_token_nll(forward(qat_params(rest, trainable, quant_config), None, ids, config), ids)

    return loss


def qat_freeze(rest: Mapping[str, Any], trainable: Trainable, quant_config: QuantConfig) -> dict[str, Any]:
    """Params with the trained linears stored as :class:`~apiq_jax.quant.QuantizedTensor`.

    Args:
      rest: the params without the trained linears.
      trainable: the trained ``{"layers": [{name: {"w", "gamma", "beta"}}]}``.
      quant_config: the quantization config (the one trained against).

    Returns:
      The full params; each trained linear is ``quantize(w, clip=ClipLogits(gamma, beta))``, a
      storage-layout QuantizedTensor that dequantizes to float32 (the trained ``w``'s dtype).
    """
    layers = [{n: quantize(p["w"], quant_config, clip=ClipLogits(p["gamma"], p["beta"])) for n, p in lt.items()}
              for lt in trainable["layers"]]
    return _merge(rest, layers)


def qat_optimizer(cfg: FinetuneConfig, clip_lr: float = 5e-3) -> optax.GradientTransformation:
    """Two groups as in ApiQ: the weights at ``cfg.learning_rate``, the clipping logits at ``clip_lr``.

    Both use :func:`apiq_jax.training.make_optimizer`'s schedule and clipping.

    Args:
      cfg: the finetuning config (steps, warm-up, weight decay, gradient clipping, and the
        learning rate of the weights).
      clip_lr: the peak learning rate of the clipping logits.

    Returns:
      An ``optax.multi_transform`` over a :data:`Trainable` tree (``w`` leaves in the
      "weights" group, ``gamma``/``beta`` in the "clip" group).

    Raises:
      ValueError: ``clip_lr`` is not > 0.
    """
    if not clip_lr > 0:
        raise ValueError(f"clip_lr={clip_lr!r} must be > 0")

    def labels(tree: Trainable) -> Any:
        return {"layers": [{n: {k: ("weights" if k == "w" else "clip") for k in p} for n, p in lt.items()}
                           for lt in tree["layers"]]}

    return optax.multi_transform(
        {"weights": make_optimizer(cfg), "clip": make_optimizer(dataclasses.replace(cfg, learning_rate=clip_lr))},
        labels,
    )

