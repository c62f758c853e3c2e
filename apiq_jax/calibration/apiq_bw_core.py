"""ApiQ-bw math: the block loss and the compiled optimisation of one block (arrays in, arrays out).

For block ``F`` with dense weights ``W``, quantized-stream input ``x_q`` and targets
``t1 = F(x_fp; W)``, ``t2 = F(x_q; W)``, ApiQ-bw minimises over the clipping logits and the
LoRA factors of the block::

    mean((t1 - F(x_q; Q(W; clip), a, b))^2) + mean((t2 - F(x_q; Q(W; clip), a, b))^2)

(the second term with ``aug_loss``) with AdamW, batch by batch, for ``epochs`` passes.
The wiring (streams, freezing, reports) is :mod:`apiq_jax.calibration.apiq_bw`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import apiq_jax.sharding as sharding
from apiq_jax.calibration.adamw import run_epochs
from apiq_jax.calibration.blocks import fake_quant_layer
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward
from apiq_jax.quant import QuantConfig
from apiq_jax.quant.fake_linear import depend_on

__all__ = ["bw_block_loss", "train_block_bw"]


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


def _batch_split(batch_size: int) -> PartitionSpec | None:
    """Data parallelism of the block's training over the mesh set by :func:`jax.set_mesh` (traced).

    Each batch's ``batch_size`` samples are split over ``("data", "fsdp")`` (or ``"data"``)
    when it is a multiple of the ``"data"`` axis: every device computes the loss of its own
    samples and the compiler sums the gradients. Otherwise (the reference's
    ``batch_size=1``: one sample per step, nothing to split without changing the algorithm)
    the step runs replicated.

    Returns:
      The spec of one batch ``[batch_size, ...]``, or None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or "data" not in mesh.axis_names:
        return None
    try:
        return PartitionSpec(*sharding.batch_spec(mesh, batch_size))
    except ValueError:
        return None


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
    split = _batch_split(opts.batch_size)

    def loss_fn(train, batch):
        if split is not None:
            batch = tuple(None if v is None else jax.lax.with_sharding_constraint(v, split) for v in batch)
        # one batch of the (possibly 16-bit) caches at a time, in float32 like the block's weights
        # (tied to the step's state: XLA would otherwise convert whole caches ahead of the loop)
        batch = depend_on(batch, train["clip"])
        xb, t1b, t2b = (None if v is None else v.astype(jnp.float32) for v in batch)
        return bw_block_loss(train, layer, xb, t1b, t2b, config, qcfg, layer_idx)

    return run_epochs(loss_fn, train0, (x_q, t1, t2), opts, progress)
