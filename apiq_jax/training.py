"""Training: LoRA finetuning on top of a frozen quantized model, with optax and resumable orbax checkpoints.

The frozen weights (QuantizedTensor leaves, norms, embeddings) are never differentiated:
the loss is a function of the LoRA pytree only, and one jitted step updates it with an
optax optimizer. Training state (LoRA, optimizer state, step) is checkpointed every
``save_every`` steps; re-running the same call with the same ``checkpoint_dir`` resumes
from the last checkpoint and reproduces the uninterrupted run (batches are drawn from a
seed and the step number, not from a stateful iterator).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from apiq_jax.checkpoint import Checkpointer
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import forward


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of LoRA finetuning (frozen, hashable)."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be in [0, steps={self.steps}]")


def make_optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay, and optional global-norm clipping."""
    if cfg.warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1)
        )
    else:  # no warm-up: the first step already uses the peak rate
        schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def causal_lm_loss(
    lora: Mapping[str, Any],
    frozen: Mapping[str, Any],
    ids: jnp.ndarray,
    config: ModelConfig,
    lora_scale: float,
) -> jnp.ndarray:
    """Mean next-token NLL of ``ids [b, s]`` (a function of ``lora`` only; ``frozen`` is constant)."""
    frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
    return next_token_nll(forward(frozen, lora, ids, config, lora_scale=lora_scale), ids)


def next_token_nll(logits: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """Mean NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))


LossFn = Callable[[Any, Mapping[str, Any], jnp.ndarray], jnp.ndarray]


def make_train_step(
    config: ModelConfig, lora_scale: float, optimizer: optax.GradientTransformation, loss_fn: LossFn | None = None
):
    """A jitted ``step(trainable, opt_state, frozen, ids) -> (trainable, opt_state, loss)``.

    ``loss_fn(trainable, frozen, ids)`` defaults to :func:`causal_lm_loss` of a LoRA tree.
    """
    if loss_fn is None:
        def loss_fn(lora, frozen, ids):
            return causal_lm_loss(lora, frozen, ids, config, lora_scale)

    @jax.jit
    def step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows of the batch at ``step``: epoch-wise permutations seeded by (seed, epoch)."""
    per_epoch = max(n_rows // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    take = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(take) < batch_size:  # fewer rows than one batch: wrap around
        take = np.resize(perm, batch_size)
    return take


def finetune(
    frozen: Mapping[str, Any],
    lora: Mapping[str, Any],
    model_config: ModelConfig,
    lora_scale: float,
    train_ids: np.ndarray,
    cfg: FinetuneConfig = FinetuneConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[Any, list[float]]:
    """Train ``lora`` on token windows ``train_ids [n, seqlen]``; returns (lora, loss per step).

    With ``checkpoint_dir`` the state is saved every ``cfg.save_every`` steps and at the
    end, and an existing checkpoint there is resumed from (its loss history included).
    ``loss_fn(trainable, frozen, ids)`` trains another pytree in place of ``lora`` (e.g. a
    soft prompt, see :func:`apiq_jax.prompt_tuning.prompt_loss_fn`); ``optimizer`` replaces
    :func:`make_optimizer` (e.g. per-group learning rates, :func:`apiq_jax.qat.qat_optimizer`).
    """
    ids = np.asarray(train_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"train_ids must be a non-empty int array [n, seqlen >= 2], got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= model_config.vocab_size:
        raise ValueError(
            f"train_ids hold ids in [{ids.min()}, {ids.max()}]; accepted: 0 <= id < {model_config.vocab_size}"
        )
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    step_fn = make_train_step(model_config, lora_scale, optimizer, loss_fn)
    state = {"lora": lora, "opt_state": optimizer.init(lora), "step": jnp.int32(0),
             "losses": jnp.zeros((cfg.steps,), jnp.float32)}
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(ckpt.latest_step(), state)
    start = int(state["step"])
    lora, opt_state, losses = state["lora"], state["opt_state"], np.asarray(state["losses"]).copy()
    bar = tqdm(range(start, cfg.steps), desc="finetune", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        batch = jnp.asarray(ids[batch_indices(len(ids), cfg.batch_size, step, cfg.seed)], jnp.int32)
        lora, opt_state, loss = step_fn(lora, opt_state, frozen, batch)
        losses[step] = float(loss)
        bar.set_postfix(loss=f"{losses[step]:.4f}")
        done = step + 1
        if ckpt is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            ckpt.save(done, {"lora": lora, "opt_state": opt_state, "step": jnp.int32(done),
                             "losses": jnp.asarray(losses)})
    if ckpt is not None:
        ckpt.close()
    return lora, [float(x) for x in losses]
