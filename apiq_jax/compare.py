"""Side-by-side comparison of calibration methods on one model: the harness behind
``apiq-jax demo`` and ``benchmarks/calibration.py``.

:func:`compare_methods` calibrates the same full-precision model with several methods and
measures each result the same way (perplexity on held-out windows, per-block activation
error ``||x_fp - x_q||^2 / ||x_fp||^2``, stored bits per weight, calibration seconds).
:func:`format_table` renders the rows as Markdown and :func:`save_plot` draws them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from apiq_jax.calibration import METHODS, ApiQOptions, MethodSpec, get_method
from apiq_jax.evaluate import activation_errors, perplexity_ids
from apiq_jax.lora import LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.quant import QuantConfig
from apiq_jax.training import FinetuneConfig, finetune

#: rows scored per evaluation batch
EVAL_BATCH = 16


def quantized_bits_per_param(frozen: Any) -> float:
    """Stored bits (codes + constants) per weight over every QuantizedTensor of ``frozen``.

    Args:
      frozen: params with QuantizedTensor leaves.

    Returns:
      The weighted mean of :func:`apiq_jax.quant.bits_per_param`, or NaN without quantized leaves.
    """
    import math

    from apiq_jax.models.llama import flatten_params
    from apiq_jax.quant import QuantizedTensor, bits_per_param

    total_bits, total = 0.0, 0
    for leaf in flatten_params(frozen).values():
        if isinstance(leaf, QuantizedTensor):
            n = math.prod(leaf.shape)
            total_bits += bits_per_param(leaf) * n
            total += n
    return total_bits / total if total else float("nan")


def full_precision_row(params: Mapping[str, Any], config: ModelConfig, eval_ids: np.ndarray) -> dict[str, Any]:
    """The reference row: the dense model's perplexity, zero activation error.

    Args:
      params: the dense params.
      config: the model config.
      eval_ids: evaluation windows ``[n, seqlen]``.

    Returns:
      The row (``method`` "fp32").
    """
    ppl = perplexity_ids(params, eval_ids, config=config, batch_size=EVAL_BATCH).perplexity
    return {
        "method": "fp32", "label": "full precision", "bits_per_param": None, "perplexity": ppl,
        "mean_activation_error": 0.0, "activation_errors": [0.0] * config.num_hidden_layers, "seconds": None,
        "peak_rss_mb": None,
    }


def comparison_options(spec: MethodSpec, epochs: int | None = None) -> dict[str, Any]:
    """Keyword options a comparison calibrates ``spec`` with.

    Args:
      spec: the method.
      epochs: ApiQ epochs (None: :class:`~apiq_jax.calibration.ApiQOptions`' default);
        ignored by methods that do not train.

    Returns:
      ``spec.compare_options`` (LoftQ: its comparison iteration count), plus
      ``options=ApiQOptions(epochs=epochs)`` for training methods when ``epochs`` is given.
    """
    opts = dict(spec.compare_options)
    if spec.trains and epochs is not None:
        opts["options"] = ApiQOptions(epochs=epochs)
    return opts


def calibrate_and_measure(
    name: str,
    params: Mapping[str, Any],
    config: ModelConfig,
    calib_ids: np.ndarray,
    eval_ids: np.ndarray,
    qcfg: QuantConfig,
    lcfg: LoraConfig,
    *,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = False,
    finetune_ids: np.ndarray | None = None,
    finetune_config: FinetuneConfig | None = None,
) -> dict[str, Any]:
    """Calibrate with method ``name`` and measure the result: one row of the comparison.

    Args:
      name: a registry name (:data:`~apiq_jax.calibration.METHODS`).
      params: the dense params.
      config: the model config.
      calib_ids: calibration windows ``[n, seqlen]``.
      eval_ids: evaluation windows ``[m, seqlen]``.
      qcfg: the quantizer.
      lcfg: the LoRA config.
      seed: seed of the LoRA init.
      epochs: ApiQ epochs (see :func:`comparison_options`).
      progress: show progress bars.
      finetune_ids: when given, the LoRA factors are then finetuned on them (the frozen
        quantized weights untouched) and the row gains ``perplexity_finetuned`` and
        ``finetune_losses``: how good a starting point each initialisation is.
      finetune_config: the finetuning settings (default :class:`~apiq_jax.training.FinetuneConfig`).

    Returns:
      The row: method, label, scheme, bits, bits per param, perplexity, activation errors,
      calibration seconds and peak RSS.
    """
    spec = get_method(name)
    res = spec.fn(params, config, calib_ids, qcfg, lcfg, key=jax.random.PRNGKey(seed), progress=progress,
                  **comparison_options(spec, epochs))
    ppl = perplexity_ids(res.params, eval_ids, config=config, lora=res.lora, batch_size=EVAL_BATCH).perplexity
    errs = activation_errors(params, res.params, eval_ids, config=config, lora=res.lora, batch_size=EVAL_BATCH)
    row = {
        "method": name, "label": spec.label, "scheme": qcfg.scheme, "bits": qcfg.bits,
        "bits_per_param": quantized_bits_per_param(res.params), "perplexity": ppl,
        "mean_activation_error": float(np.mean(errs)), "activation_errors": [float(e) for e in errs],
        "seconds": res.report.seconds, "peak_rss_mb": res.report.peak_rss_mb,
    }
    if finetune_ids is not None:
        lora, losses = finetune(res.params, res.lora, finetune_ids, config,
                                finetune_config or FinetuneConfig(), progress=progress)
        row["perplexity_finetuned"] = perplexity_ids(res.params, eval_ids, config=config, lora=lora,
                                                     batch_size=EVAL_BATCH).perplexity
        row["finetune_losses"] = losses
    return row


def compare_methods(
    params: Mapping[str, Any],
    config: ModelConfig,
    calib_ids: np.ndarray,
    eval_ids: np.ndarray,
    methods: Sequence[str],
    *,
    bits: int = 2,
    group_size: int = 64,
    lora_config: LoraConfig | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    finetune_ids: np.ndarray | None = None,
    finetune_config: FinetuneConfig | None = None,
) -> list[dict[str, Any]]:
    """Calibrate one model with several methods and measure each result the same way.

    Args:
      params: the dense params.
      config: the model config.
      calib_ids: calibration windows ``[n, seqlen]``.
      eval_ids: evaluation windows ``[m, seqlen]``.
      methods: registry names; each runs with its spec's default scheme.
      bits: weight bits.
      group_size: quantization group size.
      lora_config: LoRA config (default rank 16, alpha 16).
      epochs: ApiQ epochs (None: the default).
      seed: seed of the LoRA init.
      progress: show progress bars.
      finetune_ids, finetune_config: see :func:`calibrate_and_measure`.

    Returns:
      The full-precision row followed by one row per method.

    Raises:
      ValueError: an unknown method name (the accepted ones are listed).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")
    lcfg = lora_config or LoraConfig(rank=16, alpha=16.0)
    rows = [full_precision_row(params, config, eval_ids)]
    for name in methods:
        qcfg = QuantConfig(bits=bits, group_size=group_size, scheme=METHODS[name].default_scheme)
        if progress:
            print(f"[compare] {name}: calibrating ({bits}-bit {qcfg.scheme}, group {group_size})",
                  flush=True, file=sys.stderr)
        rows.append(calibrate_and_measure(name, params, config, calib_ids, eval_ids, qcfg, lcfg,
                                          seed=seed, epochs=epochs, progress=progress,
                                          finetune_ids=finetune_ids, finetune_config=finetune_config))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of comparison rows.

    Args:
      rows: rows of :func:`compare_methods`.

    Returns:
      The table (a column "perplexity after finetuning" when any row has it).
    """
    tuned = any("perplexity_finetuned" in r for r in rows)
    head = "| method | bits/param | perplexity | mean act. error | calib. time (s) |"
    sep = "|---|---:|---:|---:|---:|"
    if tuned:
        head += " perplexity after finetuning |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        bpp = "32 (fp32)" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        err = "0" if r["mean_activation_error"] == 0 else f"{r['mean_activation_error']:.4f}"
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        line = f"| {r['label']} | {bpp} | {r['perplexity']:.2f} | {err} | {sec} |"
        if tuned:
            ft = r.get("perplexity_finetuned")
            line += " - |" if ft is None else f" {ft:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Bar chart of perplexity and per-block activation-error curves (PNG).

    Args:
      rows: rows of :func:`compare_methods` (the first is the full-precision one).
      path: the PNG file (parents are created).
      title: title of the perplexity panel.

    Returns:
      The path, or None when matplotlib is not importable.
    """
    try:
        from apiq_jax.plotting import pyplot, save_figure

        plt = pyplot()
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fp = rows[0]
    qrows = rows[1:]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["label"] for r in qrows]
    xs = np.arange(len(qrows))
    if any("perplexity_finetuned" in r for r in qrows):
        ax0.bar(xs - 0.2, [r["perplexity"] for r in qrows], 0.4, color="tab:blue", label="after calibration")
        ax0.bar(xs + 0.2, [r.get("perplexity_finetuned", np.nan) for r in qrows], 0.4, color="tab:green",
                label="after LoRA finetuning")
    else:
        ax0.bar(xs, [r["perplexity"] for r in qrows], color="tab:blue")
    ax0.axhline(fp["perplexity"], color="k", ls="--", label=f"full precision ({fp['perplexity']:.2f})")
    ax0.set_xticks(range(len(qrows)), labels, rotation=20, ha="right")
    ax0.set(ylabel="perplexity (held-out text)", yscale="log", title=title)
    ax0.legend()
    for r in qrows:
        ax1.plot(range(len(r["activation_errors"])), r["activation_errors"], "o-", label=r["label"])
    ax1.set_xticks(range(len(fp["activation_errors"])))
    ax1.set(yscale="log", xlabel="decoder block", ylabel="||x_fp - x_q||^2 / ||x_fp||^2",
            title="activation error per block (held-out text)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
