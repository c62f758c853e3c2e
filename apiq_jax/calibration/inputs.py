"""Checks of the arguments every calibration method shares (:func:`validate_inputs`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from apiq_jax.data import check_ids
from apiq_jax.lora import LINEARS, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import is_quantized, linear_shapes
from apiq_jax.quant import QuantConfig

__all__ = ["validate_inputs"]


def validate_inputs(
    method: str,
    params: Mapping[str, Any],
    model_config: ModelConfig,
    calib_ids: Any,
    quant_config: QuantConfig,
    lora_config: LoraConfig,
) -> np.ndarray:
    """Check the common arguments of calibration method ``method``; the ids as int32 ``[n, seqlen]``.

    Args:
      method: the registry name; ``quant_config``'s bits and scheme must be ones it accepts
        (:class:`~apiq_jax.calibration.registry.MethodSpec`).
      params: dense params pytree with all seven linears of every layer.
      model_config: the model config.
      calib_ids: int token ids ``[n, seqlen]`` (or one row ``[seqlen]``).
      quant_config: the quantizer config.
      lora_config: the LoRA config.

    Returns:
      The ids as int32 numpy ``[n, seqlen]``.

    Raises:
      ValueError: naming the bad value: wrong config types, bits or a scheme the method does
        not accept, a params tree whose linears are not dense ``[out, in]`` arrays of the
        config's shapes, ids that are not integers ``[n, seqlen]``, an empty calibration set,
        ids outside ``[0, vocab_size)``, a group size larger than a linear's input width.
    """
    from apiq_jax.calibration.registry import get_method  # the registry imports every method

    _check_configs(model_config, quant_config, lora_config)
    get_method(method).check_quant_config(quant_config)
    _check_params(params, model_config)
    _check_group_size(quant_config, model_config)
    return _check_calib_ids(calib_ids, model_config.vocab_size)


def _check_configs(model_config: Any, quant_config: Any, lora_config: Any) -> None:
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(quant_config, QuantConfig):
        raise ValueError(f"quant_config must be an apiq_jax.quant.QuantConfig, got {quant_config!r}")
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"lora_config must be an apiq_jax.lora.LoraConfig, got {lora_config!r}")


def _check_params(params: Any, model_config: ModelConfig) -> None:
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError("params must be the model params dict (with a 'layers' list)")
    if len(params["layers"]) != model_config.num_hidden_layers:
        raise ValueError(
            f"params have {len(params['layers'])} layers but model_config.num_hidden_layers="
            f"{model_config.num_hidden_layers}"
        )
    shapes = linear_shapes(model_config)
    for i, layer in enumerate(params["layers"]):
        for name in LINEARS:
            w = layer.get(name)
            if w is None:
                raise ValueError(f"params layers.{i} has no linear {name!r}")
            if is_quantized(w):
                raise ValueError(
                    f"params layers.{i}.{name} is already quantized; calibration needs the dense "
                    "full-precision weights"
                )
            if tuple(w.shape) != shapes[name]:
                raise ValueError(f"params layers.{i}.{name} has shape {tuple(w.shape)}; expected {shapes[name]}")


def _check_group_size(quant_config: QuantConfig, model_config: ModelConfig) -> None:
    gs = quant_config.group_size
    shapes = linear_shapes(model_config)
    for name, (_, in_f) in shapes.items():
        if gs is not None and gs > in_f:
            raise ValueError(
                f"group_size={gs} is larger than the input width {in_f} of {name} in this model; "
                f"accepted: a group size <= {min(s[1] for s in shapes.values())} (or None for one "
                "group per row)"
            )


def _check_calib_ids(calib_ids: Any, vocab_size: int) -> np.ndarray:
    if isinstance(calib_ids, (list, tuple)) and len(calib_ids) == 0:
        raise ValueError("the calibration set is empty (0 samples); give at least one row of token ids")
    arr = np.asarray(calib_ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"calibration ids must have shape [n_samples, seqlen], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"the calibration set is empty (ids of shape {arr.shape}); give at least one row of token ids"
        )
    try:
        check_ids(arr, vocab_size)
    except ValueError as e:
        raise ValueError(f"calibration ids (rows are samples): {e}") from None
    return arr.astype(np.int32)
