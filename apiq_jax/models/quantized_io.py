"""Saved quantized-model directory: frozen weights, LoRA factors and metadata.

Layout of ``out_dir``::

    config.json          HF config of the base model (AutoConfig can read it)
    frozen.safetensors   every leaf of ``frozen`` under flat keys:
                           "embed_tokens", "norm", "lm_head", "layers.3.input_layernorm", ...
                           "layers.3.q_proj.codes" (packed uint32), ".scales", ".zeros",
                           ".scales.codes"/".scales.absmax"/".scales.mean" (double quant)
    lora.safetensors     "layers.3.q_proj.a" [in, r], "layers.3.q_proj.b" [r, out]
    apiq_meta.json       format/version, the static aux data of each QuantizedTensor
                         (shape, dtype, QuantConfig), the LoraConfig and user metadata
    tokenizer files      copied from ``tokenizer_source`` when given

Codes stay bit-packed on disk; loading rebuilds identical QuantizedTensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import CONFIG_FILE, copy_tokenizer_files, load_hf_config
from apiq_jax.models.llama import Params, check_params, flatten_params, unflatten_params
from apiq_jax.quant import QuantizedTensor

FORMAT = "apiq-jax-quantized"
VERSION = 1
FROZEN_FILE = "frozen.safetensors"
LORA_FILE = "lora.safetensors"
META_FILE = "apiq_meta.json"


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a saved quantized model (an ``apiq_meta.json``).

    Args:
      path: a directory.

    Returns:
      Whether ``path/apiq_meta.json`` is a file.
    """
    return (Path(path) / META_FILE).is_file()


def _np(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def save_quantized(
    out_dir: str | os.PathLike,
    frozen: Mapping[str, Any],
    lora: Lora | None,
    model_config: ModelConfig,
    metadata: Mapping[str, Any] | None = None,
    *,
    tokenizer_source: str | os.PathLike | None = None,
    hf_config: Any = None,
) -> Path:
    """Write ``frozen``, ``lora`` and their configs to ``out_dir`` (created if needed).

    Args:
      out_dir: target directory.
      frozen: params pytree whose linears may be QuantizedTensor leaves.
      lora: the model's :class:`~apiq_jax.lora.Lora` (its config is saved with it) or None.
      model_config: the model's :class:`ModelConfig`.
      metadata: JSON-able dict stored verbatim (method, calibration settings, ...).
      tokenizer_source: directory whose tokenizer files are copied over.
      hf_config: transformers config to write (default: built from ``model_config``).

    Returns:
      ``out_dir`` as a Path.

    Raises:
      ValueError: params that do not fit ``model_config``, a ``lora`` that is not a
        :class:`~apiq_jax.lora.Lora`, or non-JSON metadata.

    Example:
      >>> import tempfile, jax
      >>> from apiq_jax import LoraConfig, QuantConfig, load_pretrained, load_quantized, quantize_model
      >>> from apiq_jax.demo_data import DEMO_MODEL_DIR
      >>> model = load_pretrained(DEMO_MODEL_DIR)
      >>> frozen, lora = quantize_model(model.params, QuantConfig(bits=2, group_size=64),
      ...                               LoraConfig(rank=8), key=jax.random.key(0))
      >>> out = save_quantized(tempfile.mkdtemp(), frozen, lora, model.config, {"method": "rtn"},
      ...                      tokenizer_source=DEMO_MODEL_DIR)   # the tokenizer too: `apiq-jax eval` reads text
      >>> frozen2, lora2, config2, meta = load_quantized(out)
      >>> lora2.config == lora.config, meta
      (True, {'method': 'rtn'})
    """
    check_params(frozen, model_config)
    if lora is not None and not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora or None, got {type(lora).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(metadata or {})))
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, np.ndarray] = {}
    quantized: dict[str, Any] = {}
    for name, leaf in flatten_params(frozen).items():
        if isinstance(leaf, QuantizedTensor):
            for sub, arr in leaf.to_state_dict().items():
                tensors[f"{name}.{sub}"] = _np(arr)
            quantized[name] = leaf.metadata()
        else:
            tensors[name] = _np(leaf)
    lora_tensors = {k: _np(v) for k, v in flatten_params(lora.factors).items()} if lora is not None else {}

    from safetensors.numpy import save_file

    save_file(tensors, str(out / FROZEN_FILE), metadata={"format": FORMAT})
    save_file(lora_tensors, str(out / LORA_FILE), metadata={"format": FORMAT})
    cfg = hf_config if hf_config is not None else model_config.to_hf()
    cfg.to_json_file(str(out / CONFIG_FILE))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": model_config.architecture,
        "quantized": quantized,
        "lora_config": None if lora is None else lora.config.to_dict(),
        "metadata": meta_json,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, out)
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a saved quantized model needs it)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e


def load_quantized(
    path: str | os.PathLike,
) -> tuple[Params, Lora | None, ModelConfig, dict[str, Any]]:
    """Read a directory written by :func:`save_quantized`.

    Args:
      path: the directory.

    Returns:
      ``(frozen, lora, model_config, metadata)``; ``lora`` (a :class:`~apiq_jax.lora.Lora`
      carrying its config) is None when none was saved.

    Raises:
      FileNotFoundError: missing files.
      ValueError: inconsistent contents, naming the file and key.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"quantized model directory not found: {p}")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; {p} is not a saved apiq-jax quantized model")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: version={meta.get('version')!r}, this library reads version {VERSION}")
    model_config = ModelConfig.from_hf(load_hf_config(p))

    arrays = _read_safetensors(p / FROZEN_FILE)
    flat: dict[str, Any] = {}
    for name, qmeta in meta["quantized"].items():
        prefix = name + "."
        sub = {k[len(prefix):]: arrays.pop(k) for k in [k for k in arrays if k.startswith(prefix)]}
        if "codes" not in sub:
            raise ValueError(f"{p / FROZEN_FILE}: no '{name}.codes' for quantized linear {name!r}")
        try:
            flat[name] = QuantizedTensor.from_state_dict(sub, qmeta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p / FROZEN_FILE}: cannot rebuild {name!r}: {e}") from e
    flat.update({k: jnp.asarray(v) for k, v in arrays.items()})
    frozen = unflatten_params(flat)
    try:
        check_params(frozen, model_config)
    except ValueError as e:
        raise ValueError(f"{p / FROZEN_FILE}: {e}") from e

    lora_config = None if meta.get("lora_config") is None else LoraConfig.from_dict(meta["lora_config"])
    lora = None
    if lora_config is not None:
        lora_arrays = _read_safetensors(p / LORA_FILE)
        factors = unflatten_params({k: jnp.asarray(v) for k, v in lora_arrays.items()})
        n_layers = len(factors.get("layers", []))
        if n_layers != model_config.num_hidden_layers:
            raise ValueError(
                f"{p / LORA_FILE}: LoRA for {n_layers} layers, model has {model_config.num_hidden_layers}"
            )
        for i, layer in enumerate(factors["layers"]):
            if set(layer) != set(lora_config.targets):
                raise ValueError(
                    f"{p / LORA_FILE}: layer {i} has LoRA for {sorted(layer)}, "
                    f"lora_config targets {list(lora_config.targets)}"
                )
        lora = Lora(factors, lora_config)
    return frozen, lora, model_config, dict(meta.get("metadata") or {})
