"""ApiQ-lw math: the per-linear objective and the compiled optimisation of one stage.

For a linear with dense weight ``W``, input ``X`` in the full-precision block and ``X_q``
in the partially quantized block (see :mod:`apiq_jax.calibration.stages`), ApiQ-lw
minimises over its clipping logits and LoRA factors::

    mean((X W^T - (X_q Q(W; clip)^T + (alpha / r) X_q a b))^2)      (biases on both sides)

The linears of a stage share their input and are trained together on the sum of their
objectives; same-shaped ones are stacked and ``vmap``-ed. The wiring (stage inputs,
freezing, reports) is :mod:`apiq_jax.calibration.apiq_lw`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from apiq_jax.calibration.adamw import data_parallel_spec, run_epochs
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.models.llama import linear
from apiq_jax.quant import ClipLogits, QuantConfig, fake_quantize

__all__ = ["lw_stage_loss", "train_stage_lw"]


def _shape_groups(names: Sequence[str], layer: Mapping[str, Any], lora_names: Sequence[str]) -> list[list[str]]:
    """Linears that can be stacked: same shape, both with or without LoRA and bias."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault((tuple(layer[n].shape), n in lora_names, f"{n}_bias" in layer), []).append(n)
    return list(groups.values())


def lw_stage_loss(
    train: Mapping[str, Any],
    layer: Mapping[str, Any],
    x: jnp.ndarray,
    xq: jnp.ndarray,
    names: Sequence[str],
    lora_names: Sequence[str],
    qcfg: QuantConfig,
) -> jnp.ndarray:
    """Sum over the stage's linears of ``mean((x W^T - (xq Q^T + s xq a b))^2)``.

    Args:
      train: ``{"clip": {name: ClipLogits}, "lora": Lora}`` of the stage's linears.
      layer: the block's dense float32 params (weights and biases).
      x: the stage input in the full-precision block ``[b, s, in]``.
      xq: the stage input in the partially quantized block ``[b, s, in]``.
      names: the stage's linears.
      lora_names: those of them with LoRA.
      qcfg: the quantizer.

    Returns:
      The scalar loss.
    """
    total = jnp.zeros((), jnp.float32)
    for group in _shape_groups(names, layer, lora_names):
        w = jnp.stack([layer[n] for n in group])
        gamma = jnp.stack([train["clip"][n].gamma for n in group])
        beta = jnp.stack([train["clip"][n].beta for n in group])
        has_lora = group[0] in lora_names
        a = jnp.stack([train["lora"][n]["a"] for n in group]) if has_lora else None
        b = jnp.stack([train["lora"][n]["b"] for n in group]) if has_lora else None
        bias = jnp.stack([layer[f"{n}_bias"] for n in group]) if f"{group[0]}_bias" in layer else None

        def one(w_, g_, be_, a_, b_, bias_):
            target = linear(x, w_, bias=bias_)
            q = fake_quantize(w_, qcfg, clip=ClipLogits(g_, be_))
            ab = None if a_ is None else train["lora"].replace({"a": a_, "b": b_})
            return jnp.mean((target - linear(xq, q, ab, bias=bias_)) ** 2)

        total = total + jnp.sum(jax.vmap(one)(w, gamma, beta, a, b, bias))
    return total


@partial(jax.jit, static_argnames=("names", "lora_names", "qcfg", "opts"))
def train_stage_lw(layer: Mapping[str, Any], train0: Mapping[str, Any], x: jnp.ndarray, xq: jnp.ndarray,
                   progress: jnp.ndarray | None = None, *, names: tuple[str, ...], lora_names: tuple[str, ...],
                   qcfg: QuantConfig, opts: ApiQOptions) -> tuple[Any, jnp.ndarray, jnp.ndarray]:
    """The ApiQ-lw optimisation of one stage, as one compiled program.

    Args:
      layer: the block's dense float32 params.
      train0: the stage's initial ``{"clip", "lora"}`` state.
      x, xq: the stage input in the full-precision / partially quantized block ``[n, s, in]``.
      progress: a progress token (reported after every epoch), or None.
      names, lora_names, qcfg, opts: static; see :func:`lw_stage_loss`.

    Returns:
      ``(train, losses [epochs, n_batches], losses [epochs, n_batches, 1])``.
    """
    split = data_parallel_spec(opts.batch_size)

    def loss_fn(train, batch):
        if split is not None:  # data parallel over the mesh's devices (the compiler sums the gradients)
            batch = tuple(jax.lax.with_sharding_constraint(v, split) for v in batch)
        x_in, xq_in = (v.astype(jnp.float32) for v in batch)  # 16-bit caches: computed in float32
        loss = lw_stage_loss(train, layer, x_in, xq_in, names, lora_names, qcfg)
        return loss, loss[None]

    return run_epochs(loss_fn, train0, (x, xq), opts, progress)
