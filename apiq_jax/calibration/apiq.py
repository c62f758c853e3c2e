"""ApiQ calibration: block-wise (ApiQ-bw) and layer-wise (ApiQ-lw).

ApiQ (Liao & Monz, EMNLP 2024) initialises the quantized weights ``Q`` and the LoRA
factors ``a, b`` *together* so that the quantized model with LoRA reproduces the
full-precision model's activations, with inputs taken from the already-quantized
shallower part of the network.

**ApiQ-bw** (:func:`apiq_bw`), exactly the reference ``calibrate()``:

1. Embed the calibration ids; three streams start from the embeddings: ``x_fp``
   (full-precision model), ``x_q`` (quantized model so far) and the per-block target
   ``x_fp2`` (when ``aug_loss``).
2. For block i: targets with the block in full precision, ``t1 = F_i(x_fp; W)`` and
   ``t2 = F_i(x_q; W)``; ``x_fp <- t1``. Train every LoRA ``a, b`` of the block and every
   clipping logit (gamma, beta, init 4.0) — the dense ``W`` stays frozen — on
   ``mean((t1 - F_i(x_q; Q(W; clip), a, b))^2) + mean((t2 - F_i(...))^2)`` with AdamW in two
   groups (LoRA lr 5e-4, clip lr 5e-3, both weight decay 0.1, torch defaults), batch 1,
   ``epochs`` passes over the samples in fixed order, fresh optimizer state per block.
   The whole optimisation of a block is one compiled program (``lax.scan`` over batches
   inside a ``lax.scan`` over epochs).
3. Freeze (quantize once into :class:`~apiq_jax.quant.QuantizedTensor`) and propagate
   ``x_q <- F_i(x_q; Q, a, b)`` with the trained LoRA active.

**ApiQ-lw** (:func:`apiq_lw`): the same idea one linear at a time. For each linear,
minimise ``mean((X W^T - (X_q Q^T + (alpha/r) X_q a b))^2)`` where ``X`` is the linear's
input in the full-precision model and ``X_q`` its input in the partially quantized model
(every shallower linear already quantized, LoRA active). Linears sharing an input are
optimised together in one program (q/k/v; gate/up); same-shaped ones are stacked and
``vmap``-ed. Blocks and, within a block, the stages qkv -> o -> gate/up -> down are
walked in order.

Both are resumable: with ``work_dir`` set, every finished block's clip logits and LoRA
and the two streams needed to continue (``x_fp``, ``x_q``; the ``x_fp2`` target is
re-derived from ``x_q`` at the start of each block, exactly as the reference does) are
saved with orbax. Re-running the same call after an interruption continues after the last
finished block and gives a bit-identical result to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from apiq_jax.calibration.common import (
    QUANT_TARGETS,
    BlockReport,
    CalibrationReport,
    CalibrationResult,
    Stopwatch,
    embed_ids,
    freeze_layer,
    relative_error,
    run_block,
    validate_inputs,
)
from apiq_jax.lora import Lora, LoraConfig, init_lora, lora_from_factors
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import (
    attention,
    attention_mask_matrix,
    block_forward,
    linear,
    rms_norm,
    rope_cos_sin,
)
from apiq_jax.quant import QuantConfig, fake_quantize, init_clip

__all__ = [
    "LW_STAGES", "ApiQOptions", "apiq_bw", "apiq_lw", "bw_block_loss", "lw_stage_inputs",
    "make_optimizer", "scale_by_torch_adam", "torch_adamw", "train_block_bw", "train_stage_lw",
]

#: ApiQ-lw stages: linears sharing an input, in the order they are calibrated.
LW_STAGES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)

Tree = dict[str, Any]


# --- options ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ApiQOptions:
    """Hyper-parameters of ApiQ calibration (hashable; a static jit argument).

    Attributes:
      epochs: passes over the calibration samples per block (reference: 20).
      aug_loss: add the second loss term against ``F_i(x_q; W)`` (reference default: on).
        ApiQ-bw only.
      lora_lr, clip_lr: AdamW learning rates of the LoRA factors and the clipping logits.
      lora_weight_decay, clip_weight_decay: decoupled weight decay of each group.
      b1, b2, eps: AdamW moments (torch defaults).
      batch_size: samples per step (reference: 1); must divide the number of samples.
      clip_init: initial value of every clipping logit (sigmoid(4.0) = 0.982).
    """

    epochs: int = 20
    aug_loss: bool = True
    lora_lr: float = 5e-4
    clip_lr: float = 5e-3
    lora_weight_decay: float = 0.1
    clip_weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 1
    clip_init: float = 4.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"{name}={v!r} must be an int >= {0 if name == 'epochs' else 1}")
            object.__setattr__(self, name, int(v))
        for name in ("lora_lr", "clip_lr", "lora_weight_decay", "clip_weight_decay", "eps", "clip_init"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite number")
            if name != "clip_init" and v < 0:
                raise ValueError(f"{name}={v!r} must be >= 0")
            object.__setattr__(self, name, float(v))
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"{name}={v!r} must lie in [0, 1)")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "aug_loss", bool(self.aug_loss))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


class TorchAdamState(NamedTuple):
    """State of :func:`scale_by_torch_adam`: step count and the two moments."""

    count: jnp.ndarray
    mu: Any
    nu: Any


def _one_minus_pow(decay: float, count: jnp.ndarray) -> jnp.ndarray:
    """``1 - decay**count`` accurate to float32 rounding (torch computes it in float64).

    The naive float32 ``1 - 0.999**1`` is 1.3e-5 off in relative terms (0.999 is not a
    float32), which would scale every early Adam step; ``-expm1(count * log1p(-(1 - decay)))``
    with the logarithm taken in float64 on the host is not.
    """
    log_decay = math.log1p(-(1.0 - decay)) if decay > 0 else -math.inf
    return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(log_decay))


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam direction ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` in torch's order of operations.

    Same math as ``optax.scale_by_adam`` with the bias corrections ``bc = 1 - b**t``
    computed accurately (see :func:`_one_minus_pow`) and the moments updated as torch does
    (``m.lerp_(g, 1 - b1)``, ``v * b2 + (1 - b2) g^2``).
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

    Equals ``optax.adamw`` mathematically; it differs only in computing the bias corrections
    to float32 accuracy, so its steps agree with torch's to float32 rounding.
    """
    return optax.chain(
        scale_by_torch_adam(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(opts: ApiQOptions) -> optax.GradientTransformation:
    """AdamW with two parameter groups, matching the reference's ``torch.optim.AdamW``.

    The train state is ``{"clip": ..., "lora": ...}``; ``optax.multi_transform`` gives each
    top-level subtree its own :func:`torch_adamw` (its lr and weight decay). The update is
    ``p <- p(1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``, torch's, to float32
    rounding (checked against torch in the tests).
    """

    def adamw(lr: float, wd: float) -> optax.GradientTransformation:
        return torch_adamw(lr, b1=opts.b1, b2=opts.b2, eps=opts.eps, weight_decay=wd)

    def labels(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()}

    return optax.multi_transform(
        {"lora": adamw(opts.lora_lr, opts.lora_weight_decay), "clip": adamw(opts.clip_lr, opts.clip_weight_decay)},
        labels,
    )


# --- progress (host callbacks from inside the compiled programs) ------------------------------
class _Progress:
    """tqdm bars: one over blocks, one over the epochs of the current block/stage."""

    def __init__(self, enabled: bool, total_blocks: int, desc: str) -> None:
        self.enabled = enabled
        self.outer = None
        self.inner = None
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.outer = tqdm(total=total_blocks, desc=desc, unit="block", position=0)

    def start_inner(self, desc: str, total: int) -> None:
        if self.enabled:
            self.close_inner()
            self.inner = self._tqdm(total=total, desc=desc, unit="epoch", position=1, leave=False)

    def epoch_done(self, epoch: Any, loss: Any) -> None:
        if self.inner is not None:
            self.inner.update(1)
            self.inner.set_postfix(epoch=int(epoch) + 1, loss=f"{float(loss):.3e}")

    def close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def block_done(self, n: int = 1, **postfix: Any) -> None:
        if self.outer is not None:
            self.outer.update(n)
            if postfix:
                self.outer.set_postfix(**postfix)

    def close(self) -> None:
        self.close_inner()
        if self.outer is not None:
            self.outer.close()


_ACTIVE_PROGRESS: list[_Progress] = []


def _epoch_callback(epoch: Any, loss: Any) -> None:
    if _ACTIVE_PROGRESS:
        _ACTIVE_PROGRESS[-1].epoch_done(epoch, loss)


# --- shared training loop --------------------------------------------------------------------
def _run_epochs(
    loss_fn: Callable[[Tree, Any], tuple[jnp.ndarray, jnp.ndarray]],
    train0: Tree,
    batches: Any,
    n_batches: int,
    opts: ApiQOptions,
    progress: bool,
) -> tuple[Tree, jnp.ndarray, jnp.ndarray]:
    """AdamW over ``epochs`` x ``n_batches`` steps (traced; call inside jit).

    ``loss_fn(train, batch) -> (loss, terms)``; ``batches`` is a pytree with leading axis
    ``n_batches``. Returns the final train state, losses ``[epochs, n_batches]`` and terms
    ``[epochs, n_batches, k]`` (each taken before its step, as the reference logs them).
    """
    opt = make_optimizer(opts)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, batch):
        train, state = carry
        (loss, terms), grads = grad_fn(train, batch)
        updates, state = opt.update(grads, state, train)
        return (optax.apply_updates(train, updates), state), (loss, terms)

    def epoch(carry, e):
        carry, (losses, terms) = jax.lax.scan(step, carry, batches)
        if progress:
            jax.debug.callback(_epoch_callback, e, jnp.mean(losses))
        return carry, (losses, terms)

    (train, _), (losses, terms) = jax.lax.scan(epoch, (train0, opt.init(train0)), jnp.arange(opts.epochs))
    return train, losses, terms


def _fake_quant_layer(layer: Mapping[str, Any], clip: Mapping[str, Any], qcfg: QuantConfig) -> dict[str, Any]:
    out = dict(layer)
    for name, c in clip.items():
        out[name] = fake_quantize(layer[name], qcfg, clip=(c["gamma"], c["beta"]))
    return out


def bw_block_loss(
    train: Tree,
    layer: Mapping[str, Any],
    x_q: jnp.ndarray,
    t1: jnp.ndarray,
    t2: jnp.ndarray | None,
    config: ModelConfig,
    qcfg: QuantConfig,
    layer_idx: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """ApiQ-bw loss of one batch ``x_q [b, s, D]``: ``(loss, [term_fp, term_fp2])``.

    ``train = {"clip": {name: {"gamma", "beta"}}, "lora": Lora({name: {"a", "b"}})}`` (the
    block's :class:`~apiq_jax.lora.Lora`); every linear in ``train["clip"]`` is
    fake-quantized from its dense weight in ``layer``.
    """
    qlayer = _fake_quant_layer(layer, train["clip"], qcfg)
    y = block_forward(qlayer, x_q, config, lora=train["lora"], layer_idx=layer_idx)
    l1 = jnp.mean((t1 - y) ** 2)
    l2 = jnp.mean((t2 - y) ** 2) if t2 is not None else jnp.zeros((), l1.dtype)
    return l1 + l2, jnp.stack([l1, l2])


@partial(jax.jit, static_argnames=("config", "qcfg", "opts", "layer_idx", "progress"))
def train_block_bw(
    layer: Mapping[str, Any],
    train0: Tree,
    x_q: jnp.ndarray,
    t1: jnp.ndarray,
    t2: jnp.ndarray | None,
    *,
    config: ModelConfig,
    qcfg: QuantConfig,
    opts: ApiQOptions,
    layer_idx: int | None = None,
    progress: bool = False,
) -> tuple[Tree, jnp.ndarray, jnp.ndarray]:
    """The whole ApiQ-bw optimisation of one block, as one compiled program.

    ``x_q``, ``t1``, ``t2`` are ``[n, s, D]`` (``t2`` None without aug_loss); samples are
    taken in order, ``opts.batch_size`` at a time, for ``opts.epochs`` epochs.
    Returns ``(train, losses [epochs, n_batches], terms [epochs, n_batches, 2])``.
    """
    n = x_q.shape[0]
    bs = opts.batch_size
    nb = n // bs

    def batched(x):
        return None if x is None else x.reshape(nb, bs, *x.shape[1:])

    batches = (batched(x_q), batched(t1), batched(t2))

    def loss_fn(train, batch):
        xb, t1b, t2b = batch
        return bw_block_loss(train, layer, xb, t1b, t2b, config, qcfg, layer_idx)

    return _run_epochs(loss_fn, train0, batches, nb, opts, progress)


# --- ApiQ-lw pieces ---------------------------------------------------------------------------
def _attention_core(layer, h, config, lora, cos, sin, mask):
    """Attention output *before* o_proj (o_proj replaced by an exact identity)."""
    q_dim = config.num_attention_heads * config.head_dim
    p = {k: v for k, v in layer.items() if k not in ("o_proj", "o_proj_bias")}
    p["o_proj"] = jnp.eye(q_dim, dtype=h.dtype)
    lo = None if lora is None else lora.replace({k: v for k, v in lora.factors.items() if k != "o_proj"})
    return attention(p, h, config, cos=cos, sin=sin, mask=mask, lora=lo)


def lw_stage_inputs(
    layer: Mapping[str, Any],
    x: jnp.ndarray,
    config: ModelConfig,
    stage: int,
    lora: Lora | None = None,
    layer_idx: int | None = None,
) -> jnp.ndarray:
    """Input of the linears of ApiQ-lw ``stage`` (index into :data:`LW_STAGES`) for block input ``x``.

    Stage 0: ``norm1(x)`` (q/k/v); 1: the attention output before o_proj; 2:
    ``norm2(x + attn)`` (gate/up); 3: ``silu(gate(.)) * up(.)`` (down). Uses the model's own
    building blocks, so every linear is whatever ``layer`` holds (dense or quantized) with
    ``lora`` active where given.
    """
    b, s, _ = x.shape
    eps = config.rms_norm_eps
    h = rms_norm(x, layer["input_layernorm"], eps)
    if stage == 0:
        return h
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    cos, sin = rope_cos_sin(pos, config, x.dtype)
    mask = attention_mask_matrix(s, None, config.attention_window(layer_idx))
    core = _attention_core(layer, h, config, lora, cos, sin, mask)
    if stage == 1:
        return core
    lo = {} if lora is None else lora
    attn = linear(core, layer["o_proj"], lo.get("o_proj"), bias=layer.get("o_proj_bias"))
    m = rms_norm(x + attn, layer["post_attention_layernorm"], eps)
    if stage == 2:
        return m
    gate = linear(m, layer["gate_proj"], lo.get("gate_proj"), bias=layer.get("gate_proj_bias"))
    up = linear(m, layer["up_proj"], lo.get("up_proj"), bias=layer.get("up_proj_bias"))
    return jax.nn.silu(gate) * up


@partial(jax.jit, static_argnames=("config", "stage", "layer_idx"))
def _lw_inputs_all(layer, xs, config, stage, lora, layer_idx):
    def one(x):
        return lw_stage_inputs(layer, x[None], config, stage, lora, layer_idx)[0]

    return jax.lax.map(one, xs)


def _shape_groups(names: Sequence[str], layer: Mapping[str, Any], lora_names: Sequence[str]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault((tuple(layer[n].shape), n in lora_names, f"{n}_bias" in layer), []).append(n)
    return list(groups.values())


def _lw_loss(train, layer, x, xq, names, lora_names, qcfg):
    """Sum over the stage's linears of ``mean((x W^T - (xq Q^T + s xq a b))^2)``; same shapes vmapped."""
    total = jnp.zeros((), jnp.float32)
    for group in _shape_groups(names, layer, lora_names):
        w = jnp.stack([layer[n] for n in group])
        gamma = jnp.stack([train["clip"][n]["gamma"] for n in group])
        beta = jnp.stack([train["clip"][n]["beta"] for n in group])
        has_lora = group[0] in lora_names
        has_bias = f"{group[0]}_bias" in layer
        a = jnp.stack([train["lora"][n]["a"] for n in group]) if has_lora else None
        b = jnp.stack([train["lora"][n]["b"] for n in group]) if has_lora else None
        bias = jnp.stack([layer[f"{n}_bias"] for n in group]) if has_bias else None

        def one(w_, g_, be_, a_, b_, bias_):
            target = linear(x, w_, bias=bias_)
            q = fake_quantize(w_, qcfg, clip=(g_, be_))
            ab = None if a_ is None else train["lora"].replace({"a": a_, "b": b_})
            y = linear(xq, q, ab, bias=bias_)
            return jnp.mean((target - y) ** 2)

        total = total + jnp.sum(jax.vmap(one)(w, gamma, beta, a, b, bias))
    return total


@partial(jax.jit, static_argnames=("names", "lora_names", "qcfg", "opts", "progress"))
def train_stage_lw(
    layer: Mapping[str, Any],
    train0: Tree,
    x: jnp.ndarray,
    xq: jnp.ndarray,
    *,
    names: tuple[str, ...],
    lora_names: tuple[str, ...],
    qcfg: QuantConfig,
    opts: ApiQOptions,
    progress: bool = False,
) -> tuple[Tree, jnp.ndarray, jnp.ndarray]:
    """The ApiQ-lw optimisation of one stage (linears sharing an input), one compiled program.

    ``x``/``xq``: that input in the full-precision / partially quantized model, ``[n, s, in]``.
    """
    n = x.shape[0]
    bs = opts.batch_size
    nb = n // bs
    batches = (x.reshape(nb, bs, *x.shape[1:]), xq.reshape(nb, bs, *xq.shape[1:]))

    def loss_fn(train, batch):
        loss = _lw_loss(train, layer, batch[0], batch[1], names, lora_names, qcfg)
        return loss, loss[None]

    return _run_epochs(loss_fn, train0, batches, nb, opts, progress)


# --- resumable work directory ------------------------------------------------------------------
class _WorkDir:
    """Per-block orbax checkpoints: ``blocks/<i>`` (clip + LoRA, all kept) and ``streams/<i>``
    (``x_fp``, ``x_q`` after block i; only the newest kept), plus ``fingerprint.json`` and
    ``block_reports.json``."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        fp_file = self.path / "fingerprint.json"
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"work_dir {self.path} holds a different calibration run (differs in {diff}); "
                    "use a new work_dir or delete it to start over"
                )
        else:
            _atomic_write(fp_file, json.dumps(fingerprint, indent=2))
        opts = ocp.CheckpointManagerOptions(create=True, max_to_keep=None)
        self.blocks = ocp.CheckpointManager(self.path / "blocks", options=opts)
        self.streams = ocp.CheckpointManager(
            self.path / "streams", options=ocp.CheckpointManagerOptions(create=True, max_to_keep=1)
        )
        self.reports_file = self.path / "block_reports.json"

    def next_block(self) -> int:
        """Index of the first block that has not finished (0 when nothing was saved)."""
        last = self.streams.latest_step()
        return 0 if last is None else last + 1

    def reports(self) -> dict[int, BlockReport]:
        if not self.reports_file.exists():
            return {}
        return {int(k): BlockReport.from_dict(v) for k, v in json.loads(self.reports_file.read_text()).items()}

    def save(self, i: int, block_state: Tree, streams: Tree, report: BlockReport) -> None:
        """Persist block ``i`` (state first, then the report, then the streams that mark it finished)."""
        if i in self.blocks.all_steps():  # left over from a run killed between the two saves
            self.blocks.delete(i)
        self.blocks.save(i, args=ocp.args.StandardSave(block_state))
        self.blocks.wait_until_finished()
        reports = {k: v.to_dict() for k, v in self.reports().items() if k < i}
        reports[i] = report.to_dict()
        _atomic_write(self.reports_file, json.dumps({str(k): v for k, v in sorted(reports.items())}, indent=1))
        self.streams.save(i, args=ocp.args.StandardSave(streams))
        self.streams.wait_until_finished()

    def restore_block(self, i: int, template: Tree) -> Tree:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self.blocks.restore(i, args=ocp.args.StandardRestore(abstract))

    def restore_streams(self, i: int, template: Tree) -> Tree:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self.streams.restore(i, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.blocks.close()
        self.streams.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _digest(tree: Any) -> str:
    """Cheap content hash of a pytree (shapes, dtypes and a strided sample of every leaf)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
        arr = jnp.asarray(leaf)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        flat = arr.reshape(-1)
        step = max(1, flat.size // 65536)
        h.update(np.asarray(flat[::step]).tobytes())
    return h.hexdigest()


# --- driver shared by bw and lw -----------------------------------------------------------------
def _layer_idx_arg(config: ModelConfig, i: int) -> int | None:
    """Pass the layer index only where the config mixes attention kinds (keeps one program)."""
    if config.layer_types is not None and len(set(config.layer_types)) > 1:
        return i
    return None


def _initial_lora(params, lora_config, key, lora_init) -> Tree:
    if lora_init is not None:
        return lora_from_factors(params, lora_config, lora_init)
    if key is None:
        raise ValueError("key= (a jax.random key) is required to initialise the LoRA factors")
    return init_lora(params, lora_config, key, method="qlora")


def _check_batching(n: int, opts: ApiQOptions) -> None:
    if n % opts.batch_size:
        raise ValueError(
            f"batch_size={opts.batch_size} does not divide the {n} calibration samples; accepted: a "
            f"divisor of {n}"
        )


def _as_f32(layer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}


def _calibrate(
    method: str,
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array | None,
    opts: ApiQOptions,
    lora_init: Mapping[str, Any] | None,
    work_dir: str | os.PathLike | None,
    progress: bool,
    on_block_end: Callable[[int, BlockReport], None] | None,
) -> CalibrationResult:
    ids = validate_inputs(params, model_config, calib_ids, quant_config, lora_config)
    _check_batching(ids.shape[0], opts)
    timer = Stopwatch()
    lora0 = _initial_lora(params, lora_config, key, lora_init)
    n_layers = model_config.num_hidden_layers

    wd: _WorkDir | None = None
    start = 0
    reports: dict[int, BlockReport] = {}
    if work_dir is not None:
        fingerprint = {
            "method": method,
            "model_config": json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str),
            "quant_config": dataclasses.asdict(quant_config),
            "lora_config": lora_config.to_dict(),
            "options": opts.to_dict(),
            "calib_ids": hashlib.sha256(ids.tobytes() + str(ids.shape).encode()).hexdigest(),
            "params": _digest({"embed": params["embed_tokens"], "layers": params["layers"]}),
            "lora_init": _digest(lora0),
        }
        wd = _WorkDir(work_dir, fingerprint)
        start = wd.next_block()
        reports = {k: v for k, v in wd.reports().items() if k < start}

    x_fp = embed_ids(params, ids, model_config).astype(jnp.float32)
    x_q = x_fp
    clips: list[Tree | None] = [None] * n_layers
    loras: list[Tree | None] = [None] * n_layers

    def state_template(i: int) -> Tree:
        lp = params["layers"][i]
        return {
            "clip": {n: dict(zip(("gamma", "beta"), init_clip(lp[n].shape, quant_config, opts.clip_init)))
                     for n in QUANT_TARGETS},
            "lora": lora0["layers"][i].astype(jnp.float32),
        }

    if wd is not None and start > 0:
        for i in range(start):
            st = wd.restore_block(i, state_template(i))
            clips[i], loras[i] = st["clip"], st["lora"]
        streams = wd.restore_streams(start - 1, {"x_fp": x_fp, "x_q": x_q})
        x_fp, x_q = streams["x_fp"], streams["x_q"]

    bar = _Progress(progress, n_layers, method)
    if start:
        bar.block_done(start)
    _ACTIVE_PROGRESS.append(bar)
    try:
        for i in range(start, n_layers):
            block_timer = Stopwatch()
            layer = _as_f32(params["layers"][i])
            train0 = state_template(i)
            li = _layer_idx_arg(model_config, i)
            bar.start_inner(f"block {i}", opts.epochs if method == "apiq-bw" else opts.epochs * len(LW_STAGES))
            if method == "apiq-bw":
                train, x_fp_next, x_q_next, rep = _bw_block(
                    i, layer, train0, x_fp, x_q, model_config, quant_config, opts, li, progress
                )
            else:
                train, x_fp_next, x_q_next, rep = _lw_block(
                    i, layer, train0, x_fp, x_q, model_config, quant_config, lora_config, opts, li,
                    progress,
                )
            x_fp, x_q = x_fp_next, x_q_next
            clips[i], loras[i] = train["clip"], train["lora"]
            rep = dataclasses.replace(rep, seconds=block_timer.elapsed())
            reports[i] = rep
            if wd is not None:
                wd.save(i, train, {"x_fp": x_fp, "x_q": x_q}, rep)
            bar.close_inner()
            bar.block_done(error=f"{rep.error_before:.2e}->{rep.error_after:.2e}")
            if on_block_end is not None:
                on_block_end(i, rep)
    finally:
        _ACTIVE_PROGRESS.remove(bar)
        bar.close()
        if wd is not None:
            wd.close()

    frozen_layers = []
    lora_layers = []
    clip_layers = []
    for i, lp in enumerate(params["layers"]):
        c = {n: (clips[i][n]["gamma"], clips[i][n]["beta"]) for n in QUANT_TARGETS}
        clip_layers.append(c)
        frozen_layers.append(freeze_layer(lp, quant_config, c))
        lora_layers.append({n: {k: v.astype(lora0["layers"][i][n][k].dtype) for k, v in loras[i][n].factors.items()}
                            for n in lora_config.targets})
    frozen = dict(params)
    frozen["layers"] = frozen_layers
    report = CalibrationReport.build(
        method, quant_config, lora_config, ids.shape,
        blocks=[reports[i] for i in range(n_layers)], seconds=timer.elapsed(), options=opts.to_dict(),
        extra={"resumed_from_block": start, "work_dir": None if work_dir is None else str(work_dir)},
    )
    if wd is not None:
        report.save_json(wd.path / "report.json")
        report.save_plot(wd.path / "report.png")
    return CalibrationResult(frozen, Lora({"layers": lora_layers}, lora_config), report, {"clip": {"layers": clip_layers}})


def _bw_block(i, layer, train0, x_fp, x_q, config, qcfg, opts, li, progress):
    t1 = run_block(layer, x_fp, config, None, layer_idx=li)
    t2 = run_block(layer, x_q, config, None, layer_idx=li) if opts.aug_loss else None
    start_layer = _fake_quant_layer(layer, train0["clip"], qcfg)
    y0 = run_block(start_layer, x_q, config, train0["lora"], layer_idx=li)
    err_before = relative_error(t1, y0)
    train, losses, terms = train_block_bw(
        layer, train0, x_q, t1, t2, config=config, qcfg=qcfg, opts=opts, layer_idx=li,
        progress=progress,
    )
    clip = {n: (c["gamma"], c["beta"]) for n, c in train["clip"].items()}
    frozen = freeze_layer(layer, qcfg, clip)
    x_q = run_block(frozen, x_q, config, train["lora"], layer_idx=li)
    rep = BlockReport(
        index=i, error_before=err_before, error_after=relative_error(t1, x_q),
        loss_curve=tuple(np.asarray(losses, np.float64).reshape(-1).tolist()),
        extra={"loss_terms": np.asarray(terms, np.float64).reshape(-1, 2).tolist()},
    )
    return train, t1, x_q, rep


def _lw_block(i, layer, train0, x_fp, x_q, config, qcfg, lora_config, opts, li, progress):
    lora_names = tuple(n for n in QUANT_TARGETS if n in lora_config.targets)
    t1 = run_block(layer, x_fp, config, None, layer_idx=li)
    start_layer = _fake_quant_layer(layer, train0["clip"], qcfg)
    y0 = run_block(start_layer, x_q, config, train0["lora"], layer_idx=li)
    err_before = relative_error(t1, y0)
    qlayer = dict(layer)  # linears are replaced by QuantizedTensors stage by stage
    clip: Tree = {}
    lora0: Lora = train0["lora"]
    factors: Tree = {}  # LoRA factors of the stages done so far (active in the next stages' inputs)
    curves: dict[str, list[float]] = {}
    for stage, names in enumerate(LW_STAGES):
        x_in = _lw_inputs_all(layer, x_fp, config, stage, None, li)
        xq_in = _lw_inputs_all(qlayer, x_q, config, stage, lora0.replace(factors) if factors else None, li)
        st0 = {"clip": {n: train0["clip"][n] for n in names},
               "lora": lora0.replace({n: lora0.factors[n] for n in names if n in lora_names})}
        st, losses, _ = train_stage_lw(
            layer, st0, x_in, xq_in, names=names, lora_names=tuple(n for n in names if n in lora_names),
            qcfg=qcfg, opts=opts, progress=progress,
        )
        curves["+".join(names)] = np.asarray(losses, np.float64).reshape(-1).tolist()
        clip.update(st["clip"])
        factors.update(st["lora"].factors)
        qlayer = freeze_layer(qlayer, qcfg, {n: (st["clip"][n]["gamma"], st["clip"][n]["beta"]) for n in names},
                              targets=names)
    train = {"clip": clip, "lora": lora0.replace(factors)}
    x_q = run_block(qlayer, x_q, config, train["lora"], layer_idx=li)
    total = np.sum([np.asarray(c) for c in curves.values()], axis=0) if curves else np.zeros(0)
    rep = BlockReport(
        index=i, error_before=err_before, error_after=relative_error(t1, x_q),
        loss_curve=tuple(total.tolist()), extra={"stage_loss_curves": curves},
    )
    return train, t1, x_q, rep


# --- public entry points -------------------------------------------------------------------------
def apiq_bw(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array | None = None,
    epochs: int = 20,
    aug_loss: bool = True,
    lora_lr: float = 5e-4,
    clip_lr: float = 5e-3,
    weight_decay: float = 0.1,
    batch_size: int = 1,
    clip_init: float = 4.0,
    options: ApiQOptions | None = None,
    lora_init: Mapping[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_block_end: Callable[[int, BlockReport], None] | None = None,
) -> CalibrationResult:
    """ApiQ-bw calibration (block-wise), as in the reference ``calibrate()``.

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n_samples, seqlen]`` (any count and length).
      quant_config: quantization config (e.g. ``QuantConfig(2, 64)``); all seven linears of
        every layer are quantized.
      lora_config: LoRA rank/alpha/targets.
      key: PRNG key for the QLoRA init of ``a`` (unused when ``lora_init`` is given).
      epochs, aug_loss, lora_lr, clip_lr, weight_decay, batch_size, clip_init: see
        :class:`ApiQOptions` (``weight_decay`` sets both groups); ignored when ``options``
        is given.
      options: full :class:`ApiQOptions` (overrides the individual arguments).
      lora_init: optional initial LoRA (tree or flat factors, see
        :func:`apiq_jax.lora.lora_from_factors`) instead of the QLoRA init.
      work_dir: directory for per-block orbax checkpoints, ``report.json`` and
        ``report.png``; re-running the same call resumes after the last finished block.
      progress: show tqdm bars (blocks, and epochs with the running loss).
      on_block_end: called as ``on_block_end(i, block_report)`` after block i is finished
        (and checkpointed).

    Returns:
      :class:`CalibrationResult` (frozen params with QuantizedTensor linears, LoRA, report).
    """
    opts = options or ApiQOptions(
        epochs=epochs, aug_loss=aug_loss, lora_lr=lora_lr, clip_lr=clip_lr, lora_weight_decay=weight_decay,
        clip_weight_decay=weight_decay, batch_size=batch_size, clip_init=clip_init,
    )
    return _calibrate(
        "apiq-bw", params, model_config, calib_ids, quant_config, lora_config, key=key, opts=opts,
        lora_init=lora_init, work_dir=work_dir, progress=progress, on_block_end=on_block_end,
    )


def apiq_lw(
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
    *,
    key: jax.Array | None = None,
    epochs: int = 20,
    lora_lr: float = 5e-4,
    clip_lr: float = 5e-3,
    weight_decay: float = 0.1,
    batch_size: int = 1,
    clip_init: float = 4.0,
    options: ApiQOptions | None = None,
    lora_init: Mapping[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_block_end: Callable[[int, BlockReport], None] | None = None,
) -> CalibrationResult:
    """ApiQ-lw calibration (layer-wise): one linear (or input-sharing group) at a time.

    For every linear, minimises ``mean((X W^T - (X_q Q^T + (alpha/r) X_q a b))^2)`` over the
    clipping logits and LoRA factors, where ``X`` / ``X_q`` are its inputs in the
    full-precision / partially quantized model. q/k/v and gate/up share an input and are
    trained together (same-shaped ones vmapped). Same arguments and result as
    :func:`apiq_bw` (``aug_loss`` does not apply).
    """
    opts = options or ApiQOptions(
        epochs=epochs, aug_loss=False, lora_lr=lora_lr, clip_lr=clip_lr, lora_weight_decay=weight_decay,
        clip_weight_decay=weight_decay, batch_size=batch_size, clip_init=clip_init,
    )
    return _calibrate(
        "apiq-lw", params, model_config, calib_ids, quant_config, lora_config, key=key, opts=opts,
        lora_init=lora_init, work_dir=work_dir, progress=progress, on_block_end=on_block_end,
    )
