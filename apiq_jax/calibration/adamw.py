"""``torch.optim.AdamW`` in optax, to float32 rounding, and the epoch loop ApiQ trains with.

* :func:`scale_by_torch_adam` / :func:`torch_adamw`: AdamW with torch's order of operations
  and bias corrections accurate to float32 (optax computes ``1 - 0.999**t`` in float32,
  1.3e-5 off in relative terms at ``t = 1``).
* :func:`make_optimizer`: the reference's two parameter groups (LoRA factors, clipping
  logits), each with its learning rate and weight decay.
* :func:`run_epochs`: ``epochs`` passes of AdamW over a fixed sequence of batches, traced
  into the caller's compiled program (``lax.scan`` over batches inside ``lax.scan`` over
  epochs), each step a :func:`train_step` (which a caller streaming batches from the host
  compiles alone).
* :func:`data_parallel_spec`: how a batch is split over the mesh, when it can be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

import apiq_jax.sharding as sharding
from apiq_jax.calibration.options import ApiQOptions
from apiq_jax.calibration.progress import report_epoch

__all__ = ["TorchAdamState", "data_parallel_spec", "make_optimizer", "run_epochs", "scale_by_torch_adam", "torch_adamw", "train_step"]


class TorchAdamState(NamedTuple):
    """State of :func:`scale_by_torch_adam`: step count and the two moments."""

    count: jnp.ndarray
    mu: Any
    nu: Any


def _one_minus_pow(decay: float, count: jnp.ndarray) -> jnp.ndarray:
    """``1 - decay**count`` accurate to float32 rounding (torch computes it in float64).

    ``-expm1(count * log1p(-(1 - decay)))`` with the logarithm taken in float64 on the host.
    """
    log_decay = math.log1p(-(1.0 - decay)) if decay > 0 else -math.inf
    return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(log_decay))


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam direction ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` in torch's order of operations.

    Same math as ``optax.scale_by_adam``, with the bias corrections ``bc = 1 - b**t``
    computed accurately and the moments updated as torch does (``m.lerp_(g, 1 - b1)``,
    ``v * b2 + (1 - b2) g^2``).

    Args:
      b1, b2: moment decays.
      eps: added to the root of the second moment.

    Returns:
      The optax transformation (state :class:`TorchAdamState`).
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1.0 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v * b2 + (1.0 - b2) * (g * g), state.nu, updates)
        bc1 = _one_minus_pow(b1, count)
        bc2_sqrt = jnp.sqrt(_one_minus_pow(b2, count))
        out = jax.tree.map(lambda m, v: (m / (jnp.sqrt(v) / bc2_sqrt + eps)) / bc1, mu, nu)
        return out, TorchAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def torch_adamw(
    learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
) -> optax.GradientTransformation:
    """``torch.optim.AdamW`` as an optax transformation (decoupled decay ``p(1 - lr wd)``).

    Args:
      learning_rate: the step size.
      b1, b2, eps: see :func:`scale_by_torch_adam`.
      weight_decay: decoupled weight decay.

    Returns:
      The optax transformation; its steps agree with torch's to float32 rounding.
    """
    return optax.chain(
        scale_by_torch_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(opts: ApiQOptions) -> optax.GradientTransformation:
    """AdamW with two parameter groups, matching the reference's ``torch.optim.AdamW``.

    The train state is ``{"clip": ..., "lora": ...}``; each top-level subtree gets its own
    :func:`torch_adamw` (its lr and weight decay). The update is
    ``p <- p(1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``.

    Args:
      opts: learning rates, weight decays and moments.

    Returns:
      The optax transformation for a ``{"clip", "lora"}`` train state.
    """

    def adamw(lr: float, wd: float) -> optax.GradientTransformation:
        return torch_adamw(lr, b1=opts.b1, b2=opts.b2, eps=opts.eps, weight_decay=wd)

    def labels(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()}

    return optax.multi_transform(
        {"lora": adamw(opts.lora_lr, opts.lora_weight_decay), "clip": adamw(opts.clip_lr, opts.clip_weight_decay)},
        labels,
    )


def data_parallel_spec(batch_size: int) -> PartitionSpec | None:
    """Data parallelism of a training step over the mesh set by :func:`jax.set_mesh` (traced).

    A batch's ``batch_size`` samples are split over ``("data", "fsdp")`` (or ``"data"``)
    when it is a multiple of the ``"data"`` axis: every device computes the loss of its own
    samples and the compiler sums the gradients. Otherwise (the reference's
    ``batch_size=1``: one sample per step, nothing to split without changing the algorithm)
    the step runs replicated.

    Args:
      batch_size: the samples of one batch.

    Returns:
      The spec of one batch ``[batch_size, ...]`` (apply it with
      ``jax.lax.with_sharding_constraint``), or None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or "data" not in mesh.axis_names:
        return None
    try:
        return PartitionSpec(*sharding.batch_spec(mesh, batch_size))
    except ValueError:
        return None


def train_step(loss_fn: Callable[[Any, Any], tuple[jnp.ndarray, jnp.ndarray]],
               opt: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any, Any, Any]]:
    """One AdamW step on one batch: what :func:`run_epochs` scans and a streamed loop calls.

    Args:
      loss_fn: ``loss_fn(train, batch) -> (loss, terms)``.
      opt: the optimizer (:func:`make_optimizer`).

    Returns:
      ``step(train, state, batch) -> (train, state, loss, terms)``, the loss taken before the
      update (as the reference logs it).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(train: Any, state: Any, batch: Any) -> tuple[Any, Any, Any, Any]:
        (loss, terms), grads = grad_fn(train, batch)
        updates, state = opt.update(grads, state, train)
        return optax.apply_updates(train, updates), state, loss, terms

    return step


def run_epochs(
    loss_fn: Callable[[Any, Any], tuple[jnp.ndarray, jnp.ndarray]],
    train0: Any,
    batches: Any,
    opts: ApiQOptions,
    progress: jnp.ndarray | None = None,
) -> tuple[Any, jnp.ndarray, jnp.ndarray]:
    """AdamW over ``opts.epochs`` passes of ``batches`` (traced: call it inside jit).

    Args:
      loss_fn: ``loss_fn(train, batch) -> (loss, terms)``.
      train0: the initial train state ``{"clip": ..., "lora": ...}``.
      batches: a pytree whose leaves have a leading sample axis ``[n, ...]``; batch i is
        samples ``[i * bs, (i + 1) * bs)`` with ``bs = opts.batch_size``, taken in order.
      opts: epochs and the optimizer's hyper-parameters.
      progress: a progress token (:meth:`~apiq_jax.calibration.progress.Progress.token`)
        told the mean loss after every epoch, or None.

    Returns:
      ``(train, losses [epochs, n_batches], terms [epochs, n_batches, k])``; every loss is
      taken before its step, as the reference logs them.
    """
    opt = make_optimizer(opts)
    update = train_step(loss_fn, opt)

    bs = opts.batch_size
    n_batches = jax.tree.leaves(batches)[0].shape[0] // bs

    def step(carry, i):
        # batch i sliced in place: scanning over [n_batches, bs, ...] views as xs makes XLA
        # copy the whole caches into the loop (a second copy of every activation cache)
        batch = jax.tree.map(lambda b: jax.lax.dynamic_slice_in_dim(b, i * bs, bs), batches)
        train, state, loss, terms = update(*carry, batch)
        return (train, state), (loss, terms)

    def epoch(carry, e):
        carry, (losses, terms) = jax.lax.scan(step, carry, jnp.arange(n_batches))
        report_epoch(progress, e, jnp.mean(losses))
        return carry, (losses, terms)

    (train, _), (losses, terms) = jax.lax.scan(epoch, (train0, opt.init(train0)), jnp.arange(opts.epochs))
    return train, losses, terms
