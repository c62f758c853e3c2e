"""Export a saved apiq-jax quantized model (``save_quantized``) for other runtimes.

Three formats, each a directory with the tokenizer files copied over:

* ``"peft"`` (the official ApiQ layout): the dequantized base as a plain Hugging Face
  checkpoint in ``DIR`` and the LoRA as a peft adapter in ``DIR/apiq_init``.
* ``"merged"``: one dense Hugging Face checkpoint of ``W_hat + (alpha/r) B A``.
* ``"gptq"``: a Hugging Face GPTQ checkpoint (``quantization_config`` with
  ``quant_method: gptq``, ``desc_act: false``; per quantized linear ``qweight``,
  ``qzeros``, ``scales``, ``g_idx``: :mod:`apiq_jax.interop.gptq_format`) in ``DIR`` and the
  LoRA as a peft adapter in ``DIR/apiq_init``. ``sym`` is written as false for every
  scheme: ApiQ's symmetric zero point ``2^(b-1) - 1`` differs from GPTQ's ``2^(b-1)``,
  so the zero points are always stored and read (kernels that assume a fixed zero for
  ``sym: true``, such as vLLM's Marlin path, would decode the codes wrongly).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apiq_jax.interop.gptq_format import CHECKPOINT_FORMATS, to_gptq
from apiq_jax.interop.peft_io import save_adapter
from apiq_jax.lora import merge_lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    copy_tokenizer_files,
    hf_name,
    resolve_dtype,
    save_pretrained,
)
from apiq_jax.models.llama import flatten_params
from apiq_jax.models.quantized import dequantize_params
from apiq_jax.models.quantized_io import load_quantized
from apiq_jax.models.safetensors_io import write_safetensors
from apiq_jax.quant import QuantizedTensor

FORMATS = ("peft", "merged", "gptq")
#: sub-directory of the LoRA adapter beside an exported base (the official ApiQ name)
ADAPTER_SUBDIR = "apiq_init"
#: key of quantization_config holding what GPTQ's own fields cannot say (ApiQ's scheme)
APIQ_KEY = "apiq_jax"


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the model directory itself; choose a new directory")
    if not overwrite and out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; choose a new or empty directory")


def _remove_stale(out: Path, wrote_adapter: bool) -> None:
    """Remove what an earlier content of ``out`` holds that loaders would take for part of this export.

    A weights index (loaders read the shards it names instead of ``model.safetensors``) and,
    when this export wrote no adapter, an ``apiq_init`` adapter (it would be applied on top).
    """
    (out / INDEX_FILE).unlink(missing_ok=True)
    if not wrote_adapter and (out / ADAPTER_SUBDIR).is_dir():
        shutil.rmtree(out / ADAPTER_SUBDIR)


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    dtype: Any = None,
    checkpoint_format: str = "gptq",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the quantized model directory ``model_dir`` to ``out_dir`` in format ``fmt``.

    Args:
      model_dir: a directory written by :func:`~apiq_jax.models.save_quantized`.
      out_dir: the new directory (must not exist or be empty, unless ``overwrite``).
      fmt: one of :data:`FORMATS`.
      dtype: dtype of the dense tensors written ("float32", "bfloat16", "float16"; None:
        the model's own).
      checkpoint_format: for "gptq": "gptq" (v1, zero points minus one) or "gptq_v2".
      overwrite: write into a non-empty ``out_dir`` (``apiq-jax export`` has claimed and
        checked it, see :class:`~apiq_jax.commands.outputs.OutputDir`): files of the same
        names are replaced; once the weights are written, a ``model.safetensors.index.json``
        left there and, when this export writes no adapter, an ``apiq_init`` adapter are
        removed, so no stale weights are read with the new ones.

    Returns:
      A summary ``{"format", "out", "adapter", "quantized_linears"}``.

    Raises:
      ValueError: an unknown format or dtype, a non-empty ``out_dir`` (without
        ``overwrite``), and for "gptq" a linear the GPTQ layout cannot hold exactly (named).
      FileNotFoundError: ``model_dir`` is not a saved quantized model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; accepted: {FORMATS}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint format {checkpoint_format!r} is not supported; accepted: {CHECKPOINT_FORMATS}")
    dt = None if dtype is None else resolve_dtype(dtype)
    src, out = Path(model_dir), Path(out_dir)
    _check_out(out, src, overwrite)
    frozen, lora, config, _ = load_quantized(src)
    names = [k for k, v in flatten_params(frozen).items() if isinstance(v, QuantizedTensor)]
    adapter = None
    if fmt == "merged":
        params = merge_lora(frozen, lora) if lora is not None else frozen
        save_pretrained(dequantize_params(params), out, config, dtype=dt, tokenizer_source=src)
    elif fmt == "peft":
        save_pretrained(dequantize_params(frozen), out, config, dtype=dt, tokenizer_source=src)
    else:
        write_gptq(out, frozen, config, dtype=dt, checkpoint_format=checkpoint_format)
        copy_tokenizer_files(src, out)
    if overwrite:
        _remove_stale(out, wrote_adapter=fmt != "merged" and lora is not None)
    if fmt != "merged" and lora is not None:
        adapter = save_adapter(out / ADAPTER_SUBDIR, lora)
    return {"format": fmt, "out": str(out), "adapter": None if adapter is None else str(adapter),
            "quantized_linears": len(names)}


def write_gptq(
    out_dir: str | os.PathLike, frozen: Mapping[str, Any], config: ModelConfig, *, dtype: Any = None,
    checkpoint_format: str = "gptq",
) -> Path:
    """Write ``frozen`` as a Hugging Face GPTQ checkpoint (``config.json`` + ``model.safetensors``).

    Args:
      out_dir: created if needed.
      frozen: params whose decoder linears are all QuantizedTensors with one config.
      config: the model config.
      dtype: dtype of the dense tensors (embeddings, norms, head); None: their own.
      checkpoint_format: "gptq" (v1) or "gptq_v2".

    Returns:
      ``out_dir`` as a Path.

    Raises:
      ValueError: a decoder linear that is dense, linears with different quantization
        configs, or one the GPTQ layout cannot hold (see :func:`~apiq_jax.interop.gptq_format.to_gptq`).
    """
    flat = flatten_params(frozen)
    quantized = {k: v for k, v in flat.items() if isinstance(v, QuantizedTensor)}
    dense_linears = [k for k, v in flat.items() if k.startswith("layers.") and k.split(".")[2].endswith("_proj")
                     and not isinstance(v, QuantizedTensor)]
    if not quantized:
        raise ValueError("the model has no quantized linears to write as GPTQ")
    if dense_linears:
        raise ValueError(f"GPTQ checkpoints quantize every decoder linear, but {dense_linears[:4]} are dense")
    configs = {v.config for v in quantized.values()}
    if len(configs) > 1:
        raise ValueError(f"GPTQ stores one quantization config; the linears use {sorted(map(str, configs))}")
    qcfg = configs.pop()
    tensors: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        if isinstance(v, QuantizedTensor):
            base = hf_name(k)[: -len(".weight")]
            for t, arr in to_gptq(v, k, checkpoint_format).items():
                tensors[f"{base}.{t}"] = arr
        else:
            arr = np.asarray(v if dtype is None else np.asarray(v).astype(dtype))
            tensors[hf_name(k)] = np.ascontiguousarray(arr)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf()
    hf.dtype = tensors[hf_name("embed_tokens")].dtype.name
    hf.architectures = [config.architecture]
    hf.quantization_config = {
        "quant_method": "gptq", "bits": qcfg.bits, "group_size": next(iter(quantized.values())).group_size,
        "sym": False, "desc_act": False, "checkpoint_format": checkpoint_format, "damp_percent": 0.01,
        "true_sequential": True, "static_groups": False, "lm_head": False,
        APIQ_KEY: {"scheme": qcfg.scheme},
    }
    hf.to_json_file(str(out / CONFIG_FILE))
    write_safetensors(out / SINGLE_FILE, tensors, {"format": "pt"})
    return out


__all__ = ["ADAPTER_SUBDIR", "APIQ_KEY", "FORMATS", "export_model", "write_gptq"]

