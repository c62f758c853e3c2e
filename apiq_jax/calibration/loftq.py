"""LoftQ (Li et al. 2023): alternating quantization and rank-r SVD of the residual, data-free.

:func:`loftq_matrix` is the jit-able per-matrix algorithm; :func:`loftq_init` applies it to
every LoRA-targeted linear of the model (the calibration ids only feed the error report).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from apiq_jax.calibration.baseline import baseline_result
from apiq_jax.calibration.blocks import freeze_layer
from apiq_jax.calibration.driver import BlockOutput, run_blocks
from apiq_jax.calibration.inputs import validate_inputs
from apiq_jax.calibration.progress import Progress
from apiq_jax.calibration.reports import BlockReport, CalibrationResult, Stopwatch
from apiq_jax.lora import LINEARS, Lora, LoraConfig, lora_from_factors
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = ["LoftQResult", "loftq_init", "loftq_matrix", "loftq_step"]


class LoftQResult(NamedTuple):
    """Output of :func:`loftq_matrix`.

    Attributes:
      q: the final quantized weight ``Q_T`` as a QuantizedTensor (``[out, in]``).
      a: LoRA ``a [in, r]``; ``b``: LoRA ``b [r, out]``. ``scale * (a @ b).T`` is the rank-r
        SVD approximation of ``W - Q_T``.
      iter_q: dense ``Q_t`` of every iteration ``[T, out, in]`` (None unless requested).
      iter_s: all singular values of ``W - Q_t`` for every iteration ``[T, min(out, in)]``
        (None unless requested).
    """

    q: QuantizedTensor
    a: jnp.ndarray
    b: jnp.ndarray
    iter_q: jnp.ndarray | None
    iter_s: jnp.ndarray | None


@partial(jax.jit, static_argnames=("quant_config", "rank", "num_iter", "history"))
def loftq_matrix(
    w: jnp.ndarray,
    quant_config: QuantConfig,
    rank: int,
    scale: float | jnp.ndarray = 1.0,
    num_iter: int = 1,
    *,
    history: bool = False,
) -> LoftQResult:
    """LoftQ on one weight ``w [out, in]`` (pure, jitted).

    ``res = W``; for ``t = 1..T``: ``Q_t = dequant(quant(res))``; ``U S Vh = svd(W - Q_t)``;
    ``B = U_r sqrt(S_r)`` ``[out, r]``, ``A = sqrt(S_r) Vh_r`` ``[r, in]``; ``res = W - B A``.
    The factors are stored in this library's layout and divided by the LoRA scaling, half
    on each side: ``a = A.T / sqrt(scale)``, ``b = B.T / sqrt(scale)``, so that the scaled
    term ``scale * (x @ a) @ b`` equals ``x @ (B A).T`` exactly as peft's unscaled factors
    do. Every ``Q_t`` is what :func:`~apiq_jax.quant.quantize` stores, so the returned
    QuantizedTensor dequantizes to ``Q_T``.

    With ``scheme="nf"``, ``group_size=64``, ``scale_dtype="float32"`` and ``in`` a multiple
    of 64 the quantizer is exactly peft's ``NFQuantizer``. SVD signs are arbitrary: compare
    ``a @ b`` or flip one sign per rank component.

    Args:
      w: float weight ``[out, in]``.
      quant_config: quantizer (static; uniform or NormalFloat).
      rank: LoRA rank r (static), at most ``min(out, in)``.
      scale: LoRA scaling ``alpha / r`` the factors will be used with.
      num_iter: T >= 1 (static).
      history: also return every ``Q_t`` and singular-value vector (static).

    Returns:
      :class:`LoftQResult`.

    Raises:
      ValueError: ``num_iter < 1`` or a rank outside ``[1, min(out, in)]``.
    """
    if num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be >= 1")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank={rank!r} must lie in [1, {min(w.shape)}] for a weight of shape {w.shape}")
    w32 = w.astype(jnp.float32)
    res = w32
    qs, ss = [], []
    qt = a_t = b_t = None
    for _ in range(num_iter):
        qt = quantize(res.astype(w.dtype), quant_config)
        q = dequantize(qt).astype(jnp.float32)
        u, s, vh = jnp.linalg.svd(w32 - q, full_matrices=False)
        root = jnp.sqrt(s[:rank])
        b_t = u[:, :rank] * root[None, :]  # peft lora_B [out, r]
        a_t = root[:, None] * vh[:rank]  # peft lora_A [r, in]
        res = w32 - b_t @ a_t
        if history:
            qs.append(q)
            ss.append(s)
    inv = 1.0 / jnp.sqrt(jnp.asarray(scale, jnp.float32))
    return LoftQResult(
        q=qt, a=(a_t.T * inv).astype(w.dtype), b=(b_t.T * inv).astype(w.dtype),
        iter_q=jnp.stack(qs) if history else None, iter_s=jnp.stack(ss) if history else None,
    )


def loftq_step(
    quant_config: QuantConfig, lora_config: LoraConfig, num_iter: int, i: int, layer: Mapping[str, Any],
    streams: Any, bar: Progress,
) -> BlockOutput:
    """LoftQ on block ``i``: LoRA targets through :func:`loftq_matrix`, the other linears RTN.

    Args:
      quant_config: the quantizer.
      lora_config: rank, alpha and targets.
      num_iter: alternations.
      i: the block index.
      layer: its dense params.
      streams: unused (None).
      bar: unused.

    Returns:
      The frozen block and its LoRA factors.

    Raises:
      ValueError: a rank larger than a targeted linear's smaller side.
    """
    del streams, bar
    frozen = dict(layer)
    factors = {}
    for name in (n for n in LINEARS if n in lora_config.targets):
        w = layer[name]
        if lora_config.rank > min(w.shape):
            raise ValueError(
                f"LoRA rank {lora_config.rank} exceeds min(out, in) = {min(w.shape)} of "
                f"layers.{i}.{name} {tuple(w.shape)}; LoftQ needs rank <= {min(w.shape)}"
            )
        out = loftq_matrix(w, quant_config, lora_config.rank, lora_config.scale, num_iter)
        frozen[name] = out.q
        factors[name] = {"a": out.a, "b": out.b}
    frozen = freeze_layer(frozen, quant_config, where=f"layers.{i}")  # the linears without LoRA: RTN
    return BlockOutput(frozen=frozen, report=BlockReport(i), lora=Lora(factors, lora_config))


def loftq_init(params: Mapping[str, Any], model_config: ModelConfig, calib_ids: Any, quant_config: QuantConfig,
               lora_config: LoraConfig, *, key: jax.Array, progress: bool = False, num_iter: int = 1,
               measure_error: bool = True) -> CalibrationResult:
    """LoftQ initialisation of every layer (data-free).

    Args:
      params: dense full-precision params pytree.
      model_config: the model config.
      calib_ids: int token ids ``[n, seqlen]``; only used for the per-block error of the report.
      quant_config: the quantizer (bits 2, 3 or 4; "nf", "asym" or "sym").
      lora_config: LoRA rank/alpha/targets; targeted linears get :func:`loftq_matrix` with
        factors scaled for ``lora.scale = alpha / r``, the others plain RTN.
      key: unused (LoftQ is deterministic; kept for the common signature).
      progress: show a bar over the blocks.
      num_iter: alternations (peft's default 1; the LoftQ paper uses up to 5).
      measure_error: evaluate the per-block activation errors (skip with False).

    Returns:
      :class:`~apiq_jax.calibration.reports.CalibrationResult` (method "loftq").

    Raises:
      ValueError: ``num_iter < 1``, a rank larger than a targeted linear's smaller side, or
        invalid inputs.
    """
    del key
    ids = validate_inputs("loftq", params, model_config, calib_ids, quant_config, lora_config)
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r} must be an int >= 1")
    timer = Stopwatch()
    step = partial(loftq_step, quant_config, lora_config, num_iter)
    outputs = run_blocks(step, params["layers"], desc="loftq", progress=progress)
    lora = lora_from_factors(params, lora_config, {"layers": [o.lora.factors for o in outputs]})
    jax.block_until_ready(jax.tree.leaves(lora))
    return baseline_result("loftq", params, outputs, lora, ids, model_config, quant_config, lora_config,
                           seconds=timer.elapsed(), options={"num_iter": num_iter}, measure_error=measure_error)
