"""Hugging Face checkpoint I/O: local HF directories in, HF directories out.

Reading streams one tensor at a time through ``safetensors.safe_open`` (single file or
sharded via ``model.safetensors.index.json``), converting each to the requested dtype as
it goes, so no second full copy of the checkpoint is held. Writing produces
``config.json`` + ``model.safetensors`` that ``transformers`` (PyTorch) loads directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import (
    LlamaForCausalLM,
    Params,
    flatten_params,
    is_quantized,
    param_shapes,
    unflatten_params,
)
from apiq_jax.quant import dequantize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)
DTYPES = ("float32", "bfloat16", "float16")

_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj"}
# keys that HF checkpoints sometimes carry but that hold no learned parameters
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# --- names --------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``, with a clear error naming the file.

    Args:
      path: the file.

    Returns:
      The object.

    Raises:
      FileNotFoundError: a missing file.
      ValueError: invalid JSON or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def hf_name(name: str) -> str:
    """Our flat parameter name -> the HF safetensors key (``"layers.0.q_proj"`` ->
    ``"model.layers.0.self_attn.q_proj.weight"``).

    Args:
      name: a flat name of :func:`~apiq_jax.models.llama.param_shapes`: ``"embed_tokens"``,
        ``"norm"``, ``"lm_head"`` or ``"layers.<i>.<leaf>"`` (``"<linear>_bias"`` maps to
        the linear's ``.bias``).

    Returns:
      The HF key.

    Raises:
      ValueError: ``name`` is not a model parameter name.
    """
    if name == "embed_tokens":
        return "model.embed_tokens.weight"
    if name == "norm":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers":
        raise ValueError(f"not a model parameter name: {name!r}")
    i, leaf = parts[1], parts[2]
    suffix = "weight"
    if leaf.endswith("_bias"):
        leaf, suffix = leaf[: -len("_bias")], "bias"
    if leaf in _ATTN:
        return f"model.layers.{i}.self_attn.{leaf}.{suffix}"
    if leaf in _MLP:
        return f"model.layers.{i}.mlp.{leaf}.{suffix}"
    return f"model.layers.{i}.{leaf}.weight"


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` or a numpy/jax dtype -> jnp dtype.

    Args:
      dtype: a dtype name or dtype object.

    Returns:
      The dtype, one of :data:`DTYPES`.

    Raises:
      ValueError: ``dtype`` is not understood or not one of :data:`DTYPES`.
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r} is not understood; accepted: {DTYPES}") from e
    if dt.name not in DTYPES:
        raise ValueError(f"dtype={dt.name!r} is not supported; accepted: {DTYPES}")
    return dt


# --- config and tokenizer -----------------------------------------------------------------
def _check_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not p.is_dir():
        raise FileNotFoundError(f"expected a Hugging Face model directory, got a file: {p}")
    return p


def load_hf_config(path: str | os.PathLike) -> Any:
    """``transformers.AutoConfig`` from ``path/config.json`` (local only).

    Args:
      path: the model directory.

    Returns:
      The ``transformers`` config object.

    Raises:
      FileNotFoundError: ``path`` is not a directory or has no ``config.json``.
      ValueError: ``config.json`` cannot be read.
    """
    from transformers import AutoConfig

    p = _check_dir(path)
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found; a Hugging Face model directory needs a config.json")
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {cfg_file}: {e}") from e


def load_config(path: str | os.PathLike) -> ModelConfig:
    """:class:`ModelConfig` of the HF directory ``path`` (ValueError for unsupported models).

    Args:
      path: the model directory.

    Returns:
      The :class:`ModelConfig`.

    Raises:
      FileNotFoundError: see :func:`load_hf_config`.
      ValueError: an unreadable or unsupported config (the message names ``config.json``).
    """
    hf = load_hf_config(path)
    try:
        return ModelConfig.from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: {e}") from e


# --- weights ------------------------------------------------------------------------------
def _weight_files(p: Path) -> dict[str, list[str] | None]:
    """File name -> keys it should hold (None: whatever the single file holds)."""
    index = p / INDEX_FILE
    single = p / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        for fname in files:
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise ValueError(f"{index}: shard {fname!r} is not a file name inside {p}; paths are not followed")
            if not (p / fname).is_file():
                raise FileNotFoundError(f"shard {p / fname} listed in {index} not found")
        return dict(files)
    if single.is_file():
        return {SINGLE_FILE: None}
    others = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {others}; only safetensors is supported)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {p}{hint}")


class LazyTensor:
    """One tensor of a safetensors checkpoint, read from disk only when converted to an array.

    Holds the file, the key, the shape and the target dtype (the header is all that was
    read). ``np.asarray(t)`` / ``jnp.asarray(t)`` reads that tensor alone (``safe_open``
    maps the file; nothing else is loaded) and casts it; the result is not cached, so
    a model of lazy tensors costs no memory until a block is asked for.

    Attributes:
      path: the ``.safetensors`` file.
      key: the tensor's key in it.
      shape: its shape.
      dtype: the dtype it is cast to when read.
    """

    __slots__ = ("dtype", "key", "path", "shape")

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.key, self.shape, self.dtype = Path(path), key, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor once read (in :attr:`dtype`)."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """Read the tensor from its file and cast it to :attr:`dtype`.

        Returns:
          A host numpy array of :attr:`shape`.

        Raises:
          ValueError: the file cannot be read (truncated, corrupt), naming file and key.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                arr = f.get_tensor(self.key)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read tensor {self.key!r} from {self.path}: {e}") from e
        if not all_finite(arr):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{self.path}: tensor {self.key!r} holds {bad} NaN or inf values; the checkpoint is "
                             "damaged (re-download or re-convert it)")
        return arr.astype(self.dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.read()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor({self.path.name}:{self.key}, shape={self.shape}, dtype={self.dtype.name})"


#: values checked at once by :func:`all_finite` (its temporary mask: 4 MiB)
_FINITE_CHUNK = 1 << 22


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of ``arr`` is finite, checked a chunk at a time (no array-sized mask).

    Args:
      arr: a host array.

    Returns:
      True when there is no NaN or inf.
    """
    flat = arr.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.size, _FINITE_CHUNK))


def materialize(tree: Any) -> Any:
    """Every :class:`LazyTensor` leaf of ``tree`` read into a jax array (other leaves kept).

    Args:
      tree: a pytree (e.g. params from :func:`lazy_params`, or one layer of them).

    Returns:
      The same structure with device arrays in place of lazy tensors.
    """
    return jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, LazyTensor) else v, tree,
                        is_leaf=lambda v: isinstance(v, LazyTensor))


def checkpoint_dtype(hf_config: Any) -> jnp.dtype:
    """The storage dtype a checkpoint declares (``torch_dtype``/``dtype`` of its config.json).

    Args:
      hf_config: the ``transformers`` config.

    Returns:
      That dtype when it is one of :data:`DTYPES`, else float32 (no or another declared dtype).
    """
    declared = getattr(hf_config, "dtype", None)  # transformers >= 4.56; older ones call it torch_dtype
    if declared is None and "torch_dtype" in getattr(hf_config, "__dict__", {}):
        declared = hf_config.__dict__["torch_dtype"]
    name = str(declared).replace("torch.", "") if declared is not None else "float32"
    return jnp.dtype(name) if name in DTYPES else jnp.dtype(jnp.float32)


#: safetensors dtypes a weight may be stored in
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def lazy_params(
    path: str | os.PathLike, config: ModelConfig | None = None, dtype: Any = None
) -> Params:
    """The params pytree of the HF directory ``path`` with :class:`LazyTensor` leaves.

    Only the safetensors headers are read: every name, shape and file is checked now, the
    data when a tensor is converted (one block at a time in calibration, see
    :func:`materialize`). Peak memory is then one block, not the model.

    Args:
      path: the model directory.
      config: the model config (default: read from ``path/config.json``).
      dtype: "float32", "bfloat16" or "float16" (every tensor is cast to it when read);
        None: the checkpoint's own dtype (:func:`checkpoint_dtype`).

    Returns:
      The nested params pytree (see :mod:`apiq_jax.models.llama`) of lazy tensors.

    Raises:
      FileNotFoundError: missing directory, config, weight files or shards.
      ValueError: naming the file and key: unreadable files, missing, unexpected or
        wrongly shaped tensors; or an unsupported ``dtype``.
    """
    p = _check_dir(path)
    config = load_config(p) if config is None else config
    dt = checkpoint_dtype(load_hf_config(p)) if dtype is None else resolve_dtype(dtype)
    expected = param_shapes(config)
    by_hf = {hf_name(k): k for k in expected}
    from safetensors import safe_open

    flat: dict[str, LazyTensor] = {}
    unexpected: list[str] = []
    where: dict[str, str] = {}
    for fname, keys in _weight_files(p).items():
        fpath = p / fname
        try:
            handle = safe_open(str(fpath), framework="numpy")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read {fpath} as safetensors: {e}") from e
        with handle as f:
            available = set(f.keys())
            names = available if keys is None else keys
            for key in names:
                if key not in available:
                    raise ValueError(f"{fpath} does not hold tensor {key!r} (the index says it should)")
                if key not in by_hf:
                    if _IGNORED.match(key) or (key == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    unexpected.append(f"{key} (in {fname})")
                    continue
                ours = by_hf[key]
                if ours in flat:
                    raise ValueError(f"tensor {key!r} appears twice ({where[ours]} and {fname})")
                shape = tuple(f.get_slice(key).get_shape())
                stored = str(f.get_slice(key).get_dtype())
                if stored not in _FLOAT_DTYPES:
                    raise ValueError(
                        f"{fpath}: tensor {key!r} is stored as {stored}; accepted: a floating dtype "
                        f"({', '.join(sorted(_FLOAT_DTYPES))})"
                    )
                if shape != tuple(expected[ours]):
                    raise ValueError(
                        f"{fpath}: tensor {key!r} has shape {shape}, expected {tuple(expected[ours])} "
                        f"for the config in {p / CONFIG_FILE}"
                    )
                flat[ours] = LazyTensor(fpath, key, shape, dt)
                where[ours] = fname
    if unexpected:
        raise ValueError(
            f"{p}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"for a {config.architecture} with this config"
        )
    missing = [hf_name(k) for k in expected if k not in flat]
    if missing:
        raise ValueError(
            f"{p}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} of {len(expected)} expected by the config)"
        )
    return unflatten_params(flat)


def load_params(
    path: str | os.PathLike, config: ModelConfig | None = None, dtype: Any = None
) -> Params:
    """Read the weights of the HF directory ``path`` into a params pytree of ``dtype``.

    Streams tensor by tensor (:func:`lazy_params`, then each tensor read and converted in
    turn, so no second full copy of the checkpoint is held).

    Args:
      path: the model directory.
      config: the model config (default: read from ``path/config.json``).
      dtype: "float32", "bfloat16" or "float16" (every tensor is converted to it); None:
        the checkpoint's own dtype (:func:`checkpoint_dtype`).

    Returns:
      The nested params pytree (see :mod:`apiq_jax.models.llama`).

    Raises:
      FileNotFoundError: missing directory, config, weight files or shards.
      ValueError: naming the file and key: unreadable files, missing, unexpected or
        wrongly shaped tensors; or an unsupported ``dtype``.
    """
    return materialize(lazy_params(path, config, dtype))


def load_pretrained(path: str | os.PathLike, dtype: Any = None) -> LlamaForCausalLM:
    """Load a local HF Llama/Mistral/Qwen2 directory as a :class:`LlamaForCausalLM` (NNX).

    ``config.json`` is read with ``AutoConfig``; weights from ``model.safetensors`` or the
    sharded ``model.safetensors.index.json``. The result is callable on int32 ids
    ``[batch, seq]`` -> logits.

    Args:
      path: the model directory.
      dtype: "float32", "bfloat16" or "float16" (the parameters' and the compute dtype);
        None: the checkpoint's own ``torch_dtype`` (:func:`checkpoint_dtype`).

    Returns:
      A :class:`LlamaForCausalLM` (``.params`` the pytree, ``.config`` the ModelConfig).

    Raises:
      FileNotFoundError, ValueError: see :func:`load_params`.

    Example:
      >>> import jax.numpy as jnp
      >>> from apiq_jax import load_pretrained
      >>> from apiq_jax.demo_data import DEMO_MODEL_DIR      # the bundled 1M-parameter Llama
      >>> model = load_pretrained(DEMO_MODEL_DIR)
      >>> model.config.num_hidden_layers, model.config.vocab_size, model.dtype
      (4, 1024, dtype('float32'))
      >>> model(jnp.zeros((1, 8), jnp.int32)).shape
      (1, 8, 1024)
    """
    hf_config = load_hf_config(path)
    try:
        config = ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: {e}") from e
    dt = checkpoint_dtype(hf_config) if dtype is None else dtype
    params = load_params(path, config, dt)
    return LlamaForCausalLM(config, params, hf_config=hf_config)


# --- writing ------------------------------------------------------------------------------
def _to_numpy(x: Any, dtype: jnp.dtype | None) -> np.ndarray:
    if is_quantized(x):
        x = dequantize(x)
    if dtype is not None:
        x = jnp.asarray(x).astype(dtype)
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def save_pretrained(
    model_or_params: LlamaForCausalLM | Mapping[str, Any],
    out_dir: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    dtype: Any = None,
    hf_config: Any = None,
    tokenizer_source: str | os.PathLike | None = None,
) -> Path:
    """Write an HF directory (``config.json`` + ``model.safetensors``) loadable by transformers.

    Args:
      model_or_params: a :class:`LlamaForCausalLM` or a params pytree (QuantizedTensor
        leaves are dequantized, i.e. the dense equivalent is written).
      out_dir: created if needed.
      config: required with a params pytree.
      dtype: cast every tensor to this dtype (default: keep each tensor's dtype).
      hf_config: transformers config to write (default: the model's own, else built from
        ``config``).
      tokenizer_source: directory whose tokenizer files are copied over.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      ValueError: a params pytree without ``config``, params that do not match the
        config, or an unsupported ``dtype``.
    """
    if isinstance(model_or_params, LlamaForCausalLM):
        params = model_or_params.params
        config = config or model_or_params.config
        hf_config = hf_config if hf_config is not None else model_or_params.hf_config
    else:
        params = dict(model_or_params)
        if config is None:
            raise ValueError("save_pretrained needs config= when given a params pytree")
    from apiq_jax.models.llama import check_params

    check_params(params, config)
    dt = None if dtype is None else resolve_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if hf_config is None:
        hf_config = config.to_hf()
    else:
        hf_config = type(hf_config).from_dict(hf_config.to_dict())  # private copy
    first = params["embed_tokens"]
    out_dtype = dt if dt is not None else (dequantize(first).dtype if is_quantized(first) else first.dtype)
    hf_config.dtype = jnp.dtype(out_dtype).name
    hf_config.architectures = [config.architecture]
    hf_config.to_json_file(str(out / CONFIG_FILE))

    from safetensors.numpy import save_file

    tensors = {hf_name(k): _to_numpy(v, dt) for k, v in flatten_params(params).items()}
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, out)
    return out


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files present in ``src`` to ``dst``.

    Args:
      src: the model directory to copy from.
      dst: the directory to copy into (created when missing).

    Returns:
      The names of the files copied (those of :data:`TOKENIZER_FILES` present in ``src``).

    Raises:
      FileNotFoundError: ``src`` is not a directory.
    """
    s = _check_dir(src)
    Path(dst).mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (s / name).is_file():
            shutil.copyfile(s / name, Path(dst) / name)
            copied.append(name)
    return copied
