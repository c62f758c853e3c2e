"""Training: LoRA finetuning on top of a frozen quantized model, with optax and resumable orbax checkpoints.

The frozen weights (QuantizedTensor leaves, norms, embeddings) are never differentiated:
the loss is a function of the LoRA pytree only, and one jitted step updates it with an
optax optimizer. Training state (LoRA, optimizer state, step) is checkpointed every
``save_every`` steps; re-running the same call with the same ``checkpoint_dir`` resumes
from the last checkpoint and reproduces the uninterrupted run (batches are drawn from a
seed and the step number, not from a stateful iterator).

Memory (:class:`FinetuneConfig`): the decoder layers are stacked and run as one
``lax.scan`` (compile time and program size flat in depth), each block optionally
rematerialised (``remat``), attention is computed in query blocks beyond
:data:`~apiq_jax.models.llama.ATTENTION_CHUNK_SCORES` scores, the loss materialises the logits
of at most :data:`LOSS_CHUNK_LOGITS` values at a time, the quantized linears keep no
dense weight for the backward pass, the compute may run in bfloat16/float16 (``dtype``;
LoRA master weights, gradients and optimizer state stay float32), and ``grad_accum``
splits every batch into micro-batches accumulated inside the one jitted step.
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
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

import apiq_jax.interrupts as interrupts
import apiq_jax.sharding as sharding
from apiq_jax.checkpoint import Checkpointer, restore_failure
from apiq_jax.data import check_ids
from apiq_jax.lora import Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import (
    REMAT_POLICIES,
    cast_params,
    embed,
    final_logits,
    hidden_states,
    stack_layers,
)
from apiq_jax.qmatmul import default_backend

#: compute dtypes of finetuning (``FinetuneConfig.dtype``, ``--dtype``)
DTYPES = ("float32", "bfloat16", "float16")
#: the loss holds the logits of at most this many (token, vocab) values at a time
LOSS_CHUNK_LOGITS = 2**22


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of LoRA finetuning (frozen, hashable).

    Attributes:
      steps, batch_size, learning_rate, weight_decay, warmup_steps, max_grad_norm, seed,
        save_every: the optimisation (``batch_size`` windows per optimizer step).
      dtype: compute dtype of the forward and backward passes ("float32", "bfloat16",
        "float16"); the frozen weights are cast to it (packed codes untouched), the LoRA
        master weights, gradients and optimizer state stay float32. float16 scales the
        loss by the number of tokens of a micro-batch (undone in float32 before the update).
      remat: what the decoder blocks keep for the backward pass, one of
        :data:`~apiq_jax.models.llama.REMAT_POLICIES`: "none" (everything: the fastest,
        memory linear in depth and batch), "block" (only each block's input; every block
        is recomputed in the backward pass, about 1/3 more compute), "dots" (also the
        outputs of the linears), "sqrt" (only the input of every ~sqrt(layers)-th block,
        the least memory for about 1/4 more compute than "block"). The default "none" runs
        the same program as before; on small models on CPU no setting is consistently
        faster (``benchmarks/memory.py finetune``: within the run-to-run noise of +-10%).
      grad_accum: micro-batches per step: each batch of ``batch_size`` windows is split in
        ``grad_accum`` parts whose gradients are averaged inside the one jitted step (same
        result as one batch, a ``grad_accum``-th of the activation memory).
      scan_layers: run the decoder layers as ``lax.scan`` over stacked layers (compile time
        and program size flat in depth) rather than unrolled. None (default): scan with a
        remat policy, unrolled with "none" (XLA's CPU backend runs the unrolled layers of
        a small model faster when every intermediate is kept). Only for the default LoRA
        loss and layers that stack (the same quantization in every layer); otherwise the
        layers run unrolled.
    """

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 50
    dtype: str = "float32"
    remat: str = "none"
    grad_accum: int = 1
    scan_layers: bool | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be in [0, steps={self.steps}]")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; accepted: {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not supported; accepted: {REMAT_POLICIES}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size} "
                "(each batch is split into grad_accum equal micro-batches)"
            )
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be True, False or None (auto)")

    @property
    def scans(self) -> bool:
        """Whether the default loss runs the layers as a ``lax.scan`` (``scan_layers``, resolved)."""
        return self.remat != "none" if self.scan_layers is None else self.scan_layers


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
    dtype: Any = None,
    remat: str = "none",
    attention_impl: str = "auto",
    chunk_tokens: int | None = None,
) -> jnp.ndarray:
    """Mean next-token NLL of ``ids [b, s]`` (a function of ``lora`` only; ``frozen`` is constant).

    With the defaults this is ``next_token_nll(forward(frozen, lora, ids, config), ids)``
    whenever the logits fit in :data:`LOSS_CHUNK_LOGITS` values; beyond, the logits are
    computed and rematerialised a chunk of tokens at a time (:func:`next_token_nll_from_hidden`).

    Args:
      frozen: the frozen params (a ``"layers"`` list, or stacked layers run as one ``lax.scan``).
      lora: the model's :class:`~apiq_jax.lora.Lora` (list or stacked layers).
      ids: int token ids ``[b, s]``.
      config: the model config.
      backend: qmatmul backend of quantized linears.
      dtype: compute dtype (the embeddings are cast to it); None: the embeddings' dtype.
      remat: per-block rematerialisation (:data:`~apiq_jax.models.llama.REMAT_POLICIES`).
      attention_impl: :data:`~apiq_jax.models.llama.ATTENTION_IMPLS`.
      chunk_tokens: tokens whose logits are computed at once; None: as many as hold
        :data:`LOSS_CHUNK_LOGITS` values.

    Returns:
      The scalar float32 loss.

    Raises:
      ValueError: an unknown ``remat`` or ``attention_impl``.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, frozen)
    x = embed(frozen, ids, config)
    if dtype is not None:
        x = x.astype(dtype)
    h = hidden_states(frozen, lora, x, config, backend=backend, remat=remat, attention_impl=attention_impl)
    return next_token_nll_from_hidden(frozen, h, ids, config, backend=backend, chunk_tokens=chunk_tokens)


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


def next_token_nll_from_hidden(
    params: Mapping[str, Any],
    h: jnp.ndarray,
    ids: jnp.ndarray,
    config: ModelConfig,
    *,
    backend: str | None = None,
    chunk_tokens: int | None = None,
) -> jnp.ndarray:
    """:func:`next_token_nll` of the logits of the last hidden states ``h``, in token chunks.

    The ``b * (s - 1)`` predicting positions are cut into chunks of ``chunk_tokens``; a
    ``lax.scan`` computes each chunk's logits (final norm and head,
    :func:`~apiq_jax.models.llama.final_logits`), their float32 cross-entropy and sum, and
    rematerialises them in the backward pass: at most one chunk of ``[chunk, vocab]``
    logits is alive instead of several ``[b, s, vocab]`` buffers. When everything fits in
    one chunk this is exactly ``next_token_nll(final_logits(params, h, config), ids)``.

    Args:
      params: the model params (final norm, head or tied embeddings).
      h: the last decoder block's output ``[b, s, D]``.
      ids: int token ids ``[b, s]``.
      config: the model config.
      backend: qmatmul backend of a quantized head.
      chunk_tokens: tokens per chunk; None: ``max(1, LOSS_CHUNK_LOGITS // vocab_size)``.

    Returns:
      The scalar float32 mean NLL.

    Raises:
      ValueError: a ``chunk_tokens`` that is not a positive int.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_LOGITS // config.vocab_size)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive int or None")
    b, s, d = h.shape
    n_tok = b * (s - 1)
    if n_tok <= chunk_tokens:
        return next_token_nll(final_logits(params, h, config, backend=backend, dtype=jnp.float32), ids)
    n_chunks = -(-n_tok // chunk_tokens)
    pad = n_chunks * chunk_tokens - n_tok
    hs = jnp.pad(h[:, :-1].reshape(n_tok, d), ((0, pad), (0, 0))).reshape(n_chunks, chunk_tokens, d)
    labels = jnp.pad(ids[:, 1:].reshape(n_tok), (0, pad)).reshape(n_chunks, chunk_tokens)
    weights = (jnp.arange(n_chunks * chunk_tokens) < n_tok).astype(jnp.float32).reshape(n_chunks, chunk_tokens)

    @jax.checkpoint
    def chunk_sum(hc: jnp.ndarray, lc: jnp.ndarray, wc: jnp.ndarray) -> jnp.ndarray:
        logits = final_logits(params, hc, config, backend=backend, dtype=jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, lc) * wc)

    def body(total: jnp.ndarray, xs: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, None]:
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, labels, weights))
    return total / n_tok


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
    finetune_config: FinetuneConfig | None = None,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[Any, Any, jnp.ndarray]]:
    """A jitted ``step(frozen, trainable, opt_state, ids) -> (trainable, opt_state, loss)``.

    With ``finetune_config.grad_accum = A`` the batch ``ids [b, s]`` is split into ``A``
    micro-batches ``[b / A, s]``; a ``lax.scan`` over them sums the float32 losses and
    gradients, and their means make the update (equal to one batch of ``b``). With
    ``dtype="float16"`` the loss is scaled by the tokens of a micro-batch before
    differentiation and the gradients unscaled in float32.

    Args:
      config: the model config.
      optimizer: the optax transformation.
      loss_fn: ``loss_fn(frozen, trainable, ids)``; default :func:`causal_lm_loss` of a
        :class:`~apiq_jax.lora.Lora` with the config's ``dtype`` and ``remat``.
      backend: qmatmul backend used by the default loss.
      finetune_config: ``dtype``, ``remat`` and ``grad_accum`` (default
        :class:`FinetuneConfig`'s).
      mesh: a :func:`apiq_jax.sharding.make_mesh` mesh, or None (one device). With a mesh
        the step is jitted with explicit in/out shardings from
        :func:`apiq_jax.sharding.tree_shardings` (parameters, LoRA and optimizer state split
        over ``"fsdp"``, the batch over ``("data", "fsdp")``, the loss replicated); the
        arguments should be placed accordingly (:func:`apiq_jax.sharding.place`,
        :func:`apiq_jax.sharding.place_batch`). The compiler inserts the gathers of each
        layer's weights and the reduction of the gradients.

    Returns:
      The jitted step (gradients with respect to ``trainable`` only; ``ids``' batch size
      must be a multiple of ``grad_accum``).
    """
    cfg = FinetuneConfig() if finetune_config is None else finetune_config
    if loss_fn is None:
        backend = backend or default_backend()

        def loss_fn(frozen, lora, ids):
            return causal_lm_loss(frozen, lora, ids, config, backend=backend, dtype=cfg.dtype, remat=cfg.remat)

    accum = cfg.grad_accum

    def value_and_grad(frozen, trainable, ids):
        scale = float(ids.shape[0] * (ids.shape[1] - 1)) if cfg.dtype == "float16" else 1.0
        if scale == 1.0:
            return jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, ids)
        loss, grads = jax.value_and_grad(lambda f, t, i: loss_fn(f, t, i) * scale, argnums=1)(frozen, trainable, ids)
        return loss / scale, jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)

    def step(frozen, trainable, opt_state, ids):
        if accum == 1:
            loss, grads = value_and_grad(frozen, trainable, ids)
        else:
            micro = ids.reshape(accum, ids.shape[0] // accum, *ids.shape[1:])

            def body(carry, mb):
                loss, grads = value_and_grad(frozen, trainable, mb)
                return jax.tree.map(jnp.add, carry, (loss.astype(jnp.float32), grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), trainable))
            (loss, grads), _ = jax.lax.scan(body, zeros, micro)
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        grads = jax.tree.map(lambda g, t: g.astype(t.dtype), grads, trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step) if mesh is None else _sharded_step(step, mesh)


def _sharded_step(step: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``step`` jitted with the shardings of its arguments' trees on ``mesh`` (one program per tree shape).

    The returned function also has ``.lower(frozen, trainable, opt_state, ids)`` (arrays or
    ``jax.ShapeDtypeStruct``) for ``compile().memory_analysis()`` per device.
    """
    programs: dict[Any, Any] = {}

    def program(frozen, trainable, opt_state, ids):
        key = (jax.tree.structure((frozen, trainable, opt_state)), tuple(ids.shape))
        if key not in programs:
            shardings = (sharding.tree_shardings(frozen, mesh), sharding.tree_shardings(trainable, mesh),
                         sharding.tree_shardings(opt_state, mesh),
                         NamedSharding(mesh, sharding.batch_spec(mesh, ids.shape[0])))
            programs[key] = jax.jit(step, in_shardings=shardings,
                                    out_shardings=(shardings[1], shardings[2], sharding.replicated(mesh)))
        return programs[key]

    def run(frozen, trainable, opt_state, ids):
        with jax.set_mesh(mesh):  # the mesh sharding.gather_layer constrains the layers on
            return program(frozen, trainable, opt_state, ids)(frozen, trainable, opt_state, ids)

    def lower(*args):
        with jax.set_mesh(mesh):
            return program(*args).lower(*args)

    run.lower = lower
    return run


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
    mesh: Mesh | None = None,
) -> tuple[Any, list[float]]:
    """Train ``lora`` on token windows ``train_ids [n, seqlen]``.

    With ``checkpoint_dir`` the state is saved every ``finetune_config.save_every`` steps
    and at the end, and an existing checkpoint there is resumed from (its loss history
    included). The frozen params are cast to ``finetune_config.dtype`` once (packed codes
    untouched); with the default loss and ``finetune_config.scans`` the layers of the
    frozen params, the LoRA and its optimizer moments are stacked once and run as a
    ``lax.scan``. Checkpoints always hold the ``"layers"`` list form, so a run may be
    resumed with other memory settings.

    Args:
      frozen: the frozen (quantized) params.
      lora: the trainable pytree: the model's :class:`~apiq_jax.lora.Lora` by default, or
        whatever ``loss_fn`` trains (a soft prompt, adapters, QAT weights).
      train_ids: int token windows ``[n, seqlen]``; a ``np.memmap`` (e.g.
        :func:`apiq_jax.data.training_windows`) is read one batch of rows at a time.
      config: the model config.
      finetune_config: steps, batch size, learning rate, ...
      checkpoint_dir: where to save and resume (None: no checkpoints).
      progress: show a tqdm bar with the running loss.
      loss_fn: ``loss_fn(frozen, trainable, ids)`` in place of :func:`causal_lm_loss` (e.g.
        :func:`apiq_jax.prompt_tuning.prompt_loss_fn`).
      optimizer: replaces :func:`make_optimizer` (e.g. :func:`apiq_jax.qat.qat_optimizer`).
      backend: qmatmul backend of quantized linears (None: the default).
      mesh: run sharded on this mesh (:func:`apiq_jax.sharding.make_mesh`): the frozen
        params, the trainable tree and the optimizer state are placed by
        :func:`apiq_jax.sharding.place`, each batch by
        :func:`apiq_jax.sharding.place_batch` (a process reads only its devices' rows),
        and checkpoints are written by every process with orbax's multi-process support.
        None: the default device. ``batch_size / grad_accum`` must then be a multiple of
        the mesh's ``"data"`` axis.

    Returns:
      ``(trained, losses)``: the trained pytree and the loss of every step (with a mesh,
      the trained tree is sharded like the LoRA: :func:`apiq_jax.sharding.to_host` gathers it).

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
    ids = train_ids if isinstance(train_ids, np.ndarray) else np.asarray(train_ids)  # a memmap stays mapped
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"train_ids must be a non-empty int array [n, seqlen >= 2], got shape {ids.shape}")
    if cfg.batch_size % cfg.grad_accum:  # FinetuneConfig checks this too; kept for replaced configs
        raise ValueError(f"grad_accum={cfg.grad_accum} must divide batch_size={cfg.batch_size}")
    check_ids(ids, config.vocab_size)
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    if mesh is not None:
        sharding.batch_spec(mesh, cfg.batch_size // cfg.grad_accum)  # checks the data axis divides a micro-batch
    step_fn = make_train_step(config, optimizer, loss_fn, backend=backend, finetune_config=cfg, mesh=mesh)
    compute = cast_params(frozen, cfg.dtype)
    stacked = loss_fn is None and cfg.scans and isinstance(lora, Lora) and _stackable(compute)
    if stacked:
        compute = stack_layers(compute)
    if mesh is not None:
        compute, lora = sharding.place(compute, mesh), sharding.place(lora, mesh)
    # counters replicated on the mesh: every array a checkpoint holds is then a global one
    counters = (lambda x: x) if mesh is None else (lambda x: jax.device_put(x, sharding.replicated(mesh)))
    state = {"lora": lora, "opt_state": optimizer.init(_stacked(lora, stacked)), "step": counters(jnp.int32(0)),
             "losses": counters(jnp.zeros((cfg.steps,), jnp.float32))}
    if mesh is not None:
        state["opt_state"] = sharding.place(state["opt_state"], mesh)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = restore_checkpoint(ckpt, ckpt.latest_step(), _unstacked(state))
    start = int(state["step"])
    trainable, opt_state = _stacked(state["lora"], stacked), _stacked(state["opt_state"], stacked)
    losses = np.asarray(state["losses"]).copy()
    bar = tqdm(range(start, cfg.steps), desc="finetune", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        interrupts.check()  # a Ctrl-C whose exception was swallowed stops here
        rows = batch_indices(len(ids), cfg.batch_size, step, cfg.seed)
        if mesh is None:
            batch = jnp.asarray(ids[rows], jnp.int32)
        else:
            batch = sharding.place_batch(_Rows(ids, rows), mesh)
        trainable, opt_state, loss = step_fn(compute, trainable, opt_state, batch)
        losses[step] = float(loss)
        bar.set_postfix(loss=f"{losses[step]:.4f}")
        done = step + 1
        if ckpt is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            # saved with a "layers" list whatever the compute form, so checkpoints do not
            # depend on scan_layers
            ckpt.save(done, _unstacked({"lora": trainable, "opt_state": opt_state, "step": counters(jnp.int32(done)),
                                        "losses": counters(jnp.asarray(losses))}))
    if ckpt is not None:
        ckpt.close()
    return _unstacked(trainable), [float(x) for x in losses]


class _Rows:
    """``ids[rows]`` as int32, read lazily: indexing reads only the rows a process needs."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self.ids, self.rows = ids, rows
        self.shape = (len(rows), *ids.shape[1:])

    def __getitem__(self, idx: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.ids[self.rows[idx[0]]], np.int32)[(slice(None), *idx[1:])]


def restore_checkpoint(ckpt: Checkpointer, step: int, template: Any) -> Any:
    """Restore ``step`` of ``ckpt`` into ``template``; an unreadable or mismatched checkpoint is one clear error.

    Args:
      ckpt: the checkpointer.
      step: the step to restore.
      template: the state pytree to restore into.

    Returns:
      The restored state.

    Raises:
      ValueError: the checkpoint is corrupt, or was saved by a run with other settings
        (other steps, rank, model); the message says how to discard it.
    """
    try:
        return ckpt.restore(step, template)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a bad checkpoint
        raise ValueError(
            f"the training checkpoint {ckpt.directory / str(step)} cannot be restored (corrupt, or saved by a run "
            f"with other settings): {restore_failure(e)}; delete {ckpt.directory} to discard it and "
            "start training over"
        ) from e


def _stackable(params: Mapping[str, Any]) -> bool:
    try:
        stack_layers(jax.eval_shape(lambda p: p, params))
    except (ValueError, TypeError):
        return False
    return True


def _map_loras(tree: Any, fn: Callable[[Lora], Lora]) -> Any:
    return jax.tree.map(lambda x: fn(x) if isinstance(x, Lora) else x, tree, is_leaf=lambda x: isinstance(x, Lora))


def _stacked(tree: Any, stacked: bool) -> Any:
    """Every model-level Lora in ``tree`` (the LoRA, the optimizer's moments) stacked when ``stacked``."""
    return _map_loras(tree, lambda lo: lo.stack_layers()) if stacked else tree


def _unstacked(tree: Any) -> Any:
    return _map_loras(tree, lambda lo: lo.unstack_layers())
