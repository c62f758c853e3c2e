"""ApiQ-bw math: the block loss and the compiled optimisation of one block (arrays in, arrays out).

For block ``F`` with dense weights ``W``, quantized-stream input ``x_q`` and targets
``t1 = F(x_fp; W)``, ``t2 = F(x_q; W)``, ApiQ-bw minimises over the clipping logits and the
LoRA factors of the block::

    mean((t1 - F(x_q; Q(W; clip), a, b))^2) + mean((t2 - F(x_q; Q(W; clip), a, b))^2)

(the second term with ``aug_loss``) with AdamW, batch by batch, for ``epochs`` passes.
The wiring (streams, freezing, reports) is :mod:`apiq_jax.calibration.apiq_bw`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from apiq_jax.calibration.adamw import data_parallel_spec, make_optimizer, run_epochs, train_step
from apiq_jax.calibration.blocks import fake_quant_layer
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward
from apiq_jax.quant import QuantConfig
from apiq_jax.quant.fake_linear import depend_on

__all__ = ["bw_batch_step", "bw_block_loss", "train_block_bw", "train_block_bw_streamed"]


def bw_block_loss(
    train: Mapping[str, Any],
    layer: Mapping[str, Any],
    x_q: jnp.ndarray,
    t1: jnp.ndarray,
    t2: jnp.ndarray | None,
    config: ModelConfig,
    qcfg: QuantConfig,
    layer_idx: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """ApiQ-bw loss of one batch.

    Args:
      train: ``{"clip": {name: ClipLogits}, "lora": Lora}`` (the block's
        :class:`~apiq_jax.lora.Lora`); every linear in ``train["clip"]`` is fake-quantized
        from its dense weight in ``layer``.
      layer: the block's dense float32 params.
      x_q: quantized-stream inputs ``[b, s, D]``.
      t1: full-precision targets ``F(x_fp; W)``.
      t2: aug targets ``F(x_q; W)``, or None.
      config: the model config.
      qcfg: the quantizer.
      layer_idx: see :func:`apiq_jax.models.llama.block_forward`.

    Returns:
      ``(loss, [term_fp, term_fp2])`` (the second term 0 without ``t2``).
    """
    qlayer = fake_quant_layer(layer, train["clip"], qcfg, on_use=True)  # quantized where used: low training memory
    y = block_forward(qlayer, x_q, config, lora=train["lora"], layer_idx=layer_idx)
    l1 = jnp.mean((t1 - y) ** 2)
    l2 = jnp.mean((t2 - y) ** 2) if t2 is not None else jnp.zeros((), l1.dtype)
    return l1 + l2, jnp.stack([l1, l2])


@partial(jax.jit, static_argnames=("config", "qcfg", "opts", "layer_idx"))
def train_block_bw(
    layer: Mapping[str, Any], train0: Mapping[str, Any], x_q: jnp.ndarray, t1: jnp.ndarray, t2: jnp.ndarray | None,
    progress: jnp.ndarray | None = None, *, config: ModelConfig, qcfg: QuantConfig, opts: ApiQOptions,
    layer_idx: int | None = None,
) -> tuple[Any, jnp.ndarray, jnp.ndarray]:
    """The whole ApiQ-bw optimisation of one block, as one compiled program.

    Samples are taken in order, ``opts.batch_size`` at a time, for ``opts.epochs`` epochs
    (a ``lax.scan`` over batches inside a ``lax.scan`` over epochs).

    Args:
      layer: the block's dense float32 params.
      train0: the initial ``{"clip", "lora"}`` state.
      x_q, t1, t2: ``[n, s, D]`` in the cache dtype (``t2`` None without aug_loss); each
        batch is computed in float32.
      progress: a progress token (reported after every epoch), or None.
      config, qcfg, opts, layer_idx: static; see :func:`bw_block_loss` and
        :class:`~apiq_jax.calibration.options.ApiQOptions`.

    Returns:
      ``(train, losses [epochs, n_batches], terms [epochs, n_batches, 2])``.
    """
    loss_fn = partial(_batch_loss, layer=layer, config=config, qcfg=qcfg, layer_idx=layer_idx,
                      split=data_parallel_spec(opts.batch_size))
    return run_epochs(loss_fn, train0, (x_q, t1, t2), opts, progress)


def _batch_loss(train: Mapping[str, Any], batch: tuple[Any, ...], *, layer: Mapping[str, Any], config: ModelConfig,
                qcfg: QuantConfig, layer_idx: int | None, split: PartitionSpec | None) -> tuple[Any, Any]:
    """:func:`bw_block_loss` of one ``(x_q, t1, t2)`` batch of the caches, computed in float32."""
    if split is not None:
        batch = tuple(None if v is None else jax.lax.with_sharding_constraint(v, split) for v in batch)
    # one batch of the (possibly 16-bit) caches at a time, in float32 like the block's weights
    # (tied to the step's state: XLA would otherwise convert whole caches ahead of the loop)
    batch = depend_on(batch, train["clip"])
    xb, t1b, t2b = (None if v is None else v.astype(jnp.float32) for v in batch)
    return bw_block_loss(train, layer, xb, t1b, t2b, config, qcfg, layer_idx)


@partial(jax.jit, static_argnames=("config", "qcfg", "opts", "layer_idx"), donate_argnames=("train", "state"))
def bw_batch_step(train: Any, state: Any, batch: tuple[Any, ...], layer: Mapping[str, Any], *, config: ModelConfig,
                  qcfg: QuantConfig, opts: ApiQOptions, layer_idx: int | None) -> tuple[Any, Any, Any, Any]:
    """One AdamW step of ApiQ-bw on one batch sent to the device (compiled once per block shape).

    Args:
      train: the ``{"clip", "lora"}`` state (donated).
      state: the optimizer state (:func:`~apiq_jax.calibration.adamw.make_optimizer`; donated).
      batch: ``(x_q, t1, t2)`` of ``opts.batch_size`` samples (``t2`` None without aug_loss).
      layer: the block's dense float32 params.
      config, qcfg, opts, layer_idx: static; see :func:`train_block_bw`.

    Returns:
      ``(train, state, loss, terms)``, the loss taken before the step.
    """
    loss_fn = partial(_batch_loss, layer=layer, config=config, qcfg=qcfg, layer_idx=layer_idx, split=None)
    return train_step(loss_fn, make_optimizer(opts))(train, state, batch)


def train_block_bw_streamed(
    layer: Mapping[str, Any], train0: Mapping[str, Any], x_q: np.ndarray, t1: np.ndarray, t2: np.ndarray | None,
    on_epoch: Callable[[int, float], None] | None = None, *, config: ModelConfig, qcfg: QuantConfig,
    opts: ApiQOptions, layer_idx: int | None = None,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """:func:`train_block_bw` with the caches on the host: each batch is sent to the device for its step.

    The same steps in the same order (one compiled step, called once per batch), so the
    device holds the block, its train state and one batch, whatever the number of samples
    (``apiq-jax quantize --offload-activations``).

    Args:
      layer: the block's dense float32 params (on the device).
      train0: the initial ``{"clip", "lora"}`` state (not modified).
      x_q, t1, t2: host caches ``[n, s, D]`` (``t2`` None without aug_loss).
      on_epoch: called as ``on_epoch(epoch, mean loss)`` after every epoch, or None.
      config, qcfg, opts, layer_idx: see :func:`train_block_bw`.

    Returns:
      ``(train, losses [epochs, n_batches], terms [epochs, n_batches, 2])``.
    """
    bs = opts.batch_size
    n_batches = x_q.shape[0] // bs
    train = jax.tree.map(jnp.copy, train0)  # the steps donate their state; the caller's stays valid
    state = make_optimizer(opts).init(train)
    losses, terms = [], []
    for e in range(opts.epochs):
        for j in range(n_batches):
            batch = tuple(None if v is None else jnp.asarray(v[j * bs:(j + 1) * bs]) for v in (x_q, t1, t2))
            train, state, loss, term = bw_batch_step(train, state, batch, layer, config=config, qcfg=qcfg,
                                                      opts=opts, layer_idx=layer_idx)
            losses.append(loss)
            terms.append(term)
        if on_epoch is not None:
            on_epoch(e, float(np.mean(np.asarray(jnp.stack(losses[-n_batches:])))))
    losses = np.asarray(jnp.stack(losses)).reshape(opts.epochs, n_batches) if losses else np.zeros((opts.epochs, 0))
    terms = np.asarray(jnp.stack(terms)).reshape(opts.epochs, n_batches, 2) if terms else np.zeros((opts.epochs, 0, 2))
    return train, losses, terms
