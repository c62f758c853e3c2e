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
from apiq_jax.data import check_ids
from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import forward
from apiq_jax.qmatmul import default_backend


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
    """AdamW with linear warm-up then cosine decay, and optional global-norm clipping.

    Args:
      cfg: the finetuning config (learning rate, warm-up, steps, weight decay, clipping).

    Returns:
      The optax transformation.
    """
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
    frozen: Mapping[str, Any],
    lora: Lora,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    backend: str | None = None,
) -> jnp.ndarray:
    """Mean next-token NLL of ``ids [b, s]`` (a function of ``lora`` only; ``frozen`` is constant).

    Args:
      frozen: the frozen params.
      lora: the model's :class:`~apiq_jax.lora.Lora`.
      ids: int token ids ``[b, s]``.
      config: the model config.
      backend: qmatmul backend of quantized linears.

    Returns:
      The scalar float32 loss.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
    return next_token_nll(forward(frozen, lora, ids, config, backend=backend), ids)


def next_token_nll(logits: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """Mean NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float32).

    Args:
      logits: ``[b, s, vocab]``.
      ids: int token ids ``[b, s]``.

    Returns:
      The scalar mean next-token negative log-likelihood.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))


#: ``loss_fn(frozen, trainable, ids) -> scalar``: the finetuning objective of a trainable pytree.
LossFn = Callable[[Mapping[str, Any], Any, jnp.ndarray], jnp.ndarray]


def forward_loss_fn(
    forward_fn: Callable[..., jnp.ndarray], config: ModelConfig, *, lora: Lora | None = None,
    backend: str | None = None,
) -> LossFn:
    """The next-token objective of a PEFT method whose forward takes its trainable tree.

    Args:
      forward_fn: ``forward_fn(frozen, trainable, ids, config, lora=..., backend=...) -> logits``
        (e.g. :func:`apiq_jax.adapters.adapter_forward`, :func:`apiq_jax.prompt_tuning.prompt_forward`).
      config: the model config.
      lora: a :class:`~apiq_jax.lora.Lora` applied in the forward but not trained (a
        constant of the loss), or None.
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      ``loss(frozen, trainable, ids)``: the mean next-token NLL (float32), gradients stopped
      at ``frozen``; for ``finetune(..., loss_fn=...)``.
    """

    def loss(frozen: Mapping[str, Any], trainable: Any, ids: jnp.ndarray) -> jnp.ndarray:
        frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
        return next_token_nll(forward_fn(frozen, trainable, ids, config, lora=lora, backend=backend), ids)

    return loss


def make_train_step(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn | None = None,
    *,
    backend: str | None = None,
) -> Callable[..., tuple[Any, Any, jnp.ndarray]]:
    """A jitted ``step(frozen, trainable, opt_state, ids) -> (trainable, opt_state, loss)``.

    Args:
      config: the model config.
      optimizer: the optax transformation.
      loss_fn: ``loss_fn(frozen, trainable, ids)``; default :func:`causal_lm_loss` of a
        :class:`~apiq_jax.lora.Lora`.
      backend: qmatmul backend used by the default loss.

    Returns:
      The jitted step (gradients with respect to ``trainable`` only).
    """
    if loss_fn is None:
        backend = backend or default_backend()

        def loss_fn(frozen, lora, ids):
            return causal_lm_loss(frozen, lora, ids, config, backend=backend)

    @jax.jit
    def step(frozen, trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows of the batch at ``step``: epoch-wise permutations seeded by (seed, epoch).

    A function of the step (not of an iterator's state), so a resumed run draws the same
    batches as an uninterrupted one.

    Args:
      n_rows: number of training windows.
      batch_size: rows per batch.
      step: the step index (0-based).
      seed: the data-order seed.

    Returns:
      ``batch_size`` row indices.
    """
    per_epoch = max(n_rows // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    take = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(take) < batch_size:  # fewer rows than one batch: wrap around
        take = np.resize(perm, batch_size)
    return take


def finetune(
    frozen: Mapping[str, Any],
    lora: Any,
    train_ids: np.ndarray,
    config: ModelConfig,
    finetune_config: FinetuneConfig = FinetuneConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
    backend: str | None = None,
) -> tuple[Any, list[float]]:
    """Train ``lora`` on token windows ``train_ids [n, seqlen]``.

    With ``checkpoint_dir`` the state is saved every ``finetune_config.save_every`` steps
    and at the end, and an existing checkpoint there is resumed from (its loss history
    included).

    Args:
      frozen: the frozen (quantized) params.
      lora: the trainable pytree: the model's :class:`~apiq_jax.lora.Lora` by default, or
        whatever ``loss_fn`` trains (a soft prompt, adapters, QAT weights).
      train_ids: int token windows ``[n, seqlen]``.
      config: the model config.
      finetune_config: steps, batch size, learning rate, ...
      checkpoint_dir: where to save and resume (None: no checkpoints).
      progress: show a tqdm bar with the running loss.
      loss_fn: ``loss_fn(frozen, trainable, ids)`` in place of :func:`causal_lm_loss` (e.g.
        :func:`apiq_jax.prompt_tuning.prompt_loss_fn`).
      optimizer: replaces :func:`make_optimizer` (e.g. :func:`apiq_jax.qat.qat_optimizer`).
      backend: qmatmul backend of quantized linears (None: the default).

    Returns:
      ``(trained, losses)``: the trained pytree and the loss of every step.

    Example:
      >>> import jax
      >>> from apiq_jax import FinetuneConfig, LoraConfig, QuantConfig, finetune, quantize_model
      >>> from apiq_jax.models import ModelConfig, init_params
      >>> cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64,
      ...                   intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
      ...                   num_key_value_heads=2, head_dim=16)
      >>> frozen, lora = quantize_model(init_params(cfg, jax.random.key(0)), QuantConfig(bits=2, group_size=32),
      ...                               LoraConfig(rank=4), key=jax.random.key(1))
      >>> ids = jax.random.randint(jax.random.key(2), (4, 16), 0, 32)
      >>> lora, losses = finetune(frozen, lora, ids, cfg, FinetuneConfig(steps=2, batch_size=2), progress=False)
      >>> len(losses)
      2
    """
    cfg = finetune_config
    ids = np.asarray(train_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"train_ids must be a non-empty int array [n, seqlen >= 2], got shape {ids.shape}")
    check_ids(ids, config.vocab_size)
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    step_fn = make_train_step(config, optimizer, loss_fn, backend=backend)
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
        lora, opt_state, loss = step_fn(frozen, lora, opt_state, batch)
        losses[step] = float(loss)
        bar.set_postfix(loss=f"{losses[step]:.4f}")
        done = step + 1
        if ckpt is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            ckpt.save(done, {"lora": lora, "opt_state": opt_state, "step": jnp.int32(done),
                             "losses": jnp.asarray(losses)})
    if ckpt is not None:
        ckpt.close()
    return lora, [float(x) for x in losses]
