"""Saved quantized-model directory: frozen weights, LoRA factors and metadata.

Layout of ``out_dir``::

    config.json          HF config of the base model (AutoConfig can read it)
    frozen.safetensors   every leaf of ``frozen`` under flat keys:
                           "embed_tokens", "norm", "lm_head", "layers.3.input_layernorm", ...
                           "layers.3.q_proj.codes" (packed uint32), ".scales", ".zeros",
                           ".scales.codes"/".scales.absmax"/".scales.mean" (double quant)
      or, when the frozen tensors exceed ``max_shard_size`` (default 2 GB), as Hugging Face:
    frozen-00001-of-00003.safetensors ...        the same keys, a decoder layer kept in one shard
    frozen.safetensors.index.json                {"metadata": {"total_size": bytes},
                                                  "weight_map": {key: shard file}}
    lora.safetensors     "layers.3.q_proj.a" [in, r], "layers.3.q_proj.b" [r, out]
    apiq_meta.json       format/version, the static aux data of each QuantizedTensor
                         (shape, dtype, QuantConfig), the LoraConfig and user metadata
    tokenizer files      copied from ``tokenizer_source`` when given

Codes stay bit-packed on disk; loading rebuilds identical QuantizedTensors.

Saving streams: the safetensors headers come from shapes and dtypes, and one tensor at a time
is converted to host bytes and written (:mod:`~apiq_jax.models.safetensors_io`). Every file
is written under a temporary name and the files are renamed into place only once all of them
are complete (frozen files first, then lora, config and metadata; stale files of the other
layout are removed last), so a failed save leaves the previous directory intact.

Loading is lazy: :class:`QuantizedCheckpoint` reads the metadata and the safetensors headers
and checks the structure; tensors are read on demand (one, one layer, the non-layer params),
and it counts what it has read. :func:`load_quantized` reads everything through it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.lora import Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import CONFIG_FILE, copy_tokenizer_files, load_config, read_json
from apiq_jax.models.llama import Params, check_params, flatten_params, param_shapes, unflatten_params
from apiq_jax.models.safetensors_io import (
    StagedFiles,
    TensorInfo,
    parse_size,
    plan_shards,
    read_header,
    shard_names,
    write_error,
    write_safetensors,
)
from apiq_jax.quant import DoubleQuantized, QuantizedTensor

FORMAT = "apiq-jax-quantized"
VERSION = 1
FROZEN_FILE = "frozen.safetensors"
FROZEN_INDEX_FILE = "frozen.safetensors.index.json"
FROZEN_STEM = "frozen"
LORA_FILE = "lora.safetensors"
META_FILE = "apiq_meta.json"
#: Default shard size limit of the frozen tensors (as Hugging Face: 2 GB = 2e9 bytes).
DEFAULT_MAX_SHARD_SIZE = "2GB"
_SHARD_RE = re.compile(rf"^{FROZEN_STEM}-\d{{5}}-of-\d{{5}}\.safetensors$")


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a saved quantized model (an ``apiq_meta.json``).

    Args:
      path: a directory.

    Returns:
      Whether ``path/apiq_meta.json`` is a file.
    """
    return (Path(path) / META_FILE).is_file()


def _stored_arrays(qt: QuantizedTensor) -> dict[str, Any]:
    """The arrays of :meth:`QuantizedTensor.to_state_dict`, not yet converted to numpy."""
    qt.require_storage("saving")
    out: dict[str, Any] = {"codes": qt.codes}
    if isinstance(qt.scales, DoubleQuantized):
        out.update({"scales.codes": qt.scales.codes, "scales.absmax": qt.scales.absmax,
                    "scales.mean": jnp.reshape(qt.scales.mean, (1,))})
    else:
        out["scales"] = qt.scales
    if qt.zeros is not None:
        out["zeros"] = qt.zeros
    return out


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _group_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" and len(parts) > 2 else key


def save_quantized(
    out_dir: str | os.PathLike,
    frozen: Mapping[str, Any],
    lora: Lora | None,
    model_config: ModelConfig,
    metadata: Mapping[str, Any] | None = None,
    *,
    tokenizer_source: str | os.PathLike | None = None,
    hf_config: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``frozen``, ``lora`` and their configs to ``out_dir`` (created if needed).

    The frozen tensors go to one ``frozen.safetensors``, or to shards
    ``frozen-0000i-of-0000n.safetensors`` with a ``frozen.safetensors.index.json`` when they
    exceed ``max_shard_size`` (a decoder layer's tensors stay in one shard when they fit).
    Tensors are converted to host memory one at a time; files are written under temporary
    names and renamed into place once all are complete.

    Args:
      out_dir: target directory.
      frozen: params pytree whose linears may be QuantizedTensor leaves.
      lora: the model's :class:`~apiq_jax.lora.Lora` (its config is saved with it) or None.
      model_config: the model's :class:`ModelConfig`.
      metadata: JSON-able dict stored verbatim (method, calibration settings, ...).
      tokenizer_source: directory whose tokenizer files are copied over.
      hf_config: transformers config to write (default: built from ``model_config``).
      max_shard_size: the largest frozen shard, in bytes or as a string such as ``"2GB"``
        or ``"500MB"`` (see :func:`~apiq_jax.models.safetensors_io.parse_size`).

    Returns:
      ``out_dir`` as a Path.

    Raises:
      ValueError: params that do not fit ``model_config``, a ``lora`` that is not a
        :class:`~apiq_jax.lora.Lora`, non-JSON metadata or a bad ``max_shard_size``.
      OSError: a file could not be written (named in the message); the previous contents
        of ``out_dir`` are left as they were.

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
    max_bytes = parse_size(max_shard_size)
    check_params(frozen, model_config)
    if lora is not None and not isinstance(lora, Lora):
        raise ValueError(f"lora must be an apiq_jax.lora.Lora or None, got {type(lora).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(metadata or {})))
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e

    tensors: dict[str, Any] = {}
    quantized: dict[str, Any] = {}
    for name, leaf in flatten_params(frozen).items():
        if isinstance(leaf, QuantizedTensor):
            quantized[name] = leaf.metadata()  # raises for the kernel layout, before any write
            tensors.update({f"{name}.{sub}": arr for sub, arr in _stored_arrays(leaf).items()})
        else:
            tensors[name] = leaf
    groups: dict[str, list[tuple[str, int]]] = {}
    for key, arr in tensors.items():
        groups.setdefault(_group_of(key), []).append((key, _nbytes(arr)))
    shards = plan_shards(list(groups.values()), max_bytes)
    lora_tensors = flatten_params(lora.factors) if lora is not None else {}
    cfg = hf_config if hf_config is not None else model_config.to_hf()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": model_config.architecture,
        "quantized": quantized,
        "lora_config": None if lora is None else lora.config.to_dict(),
        "metadata": meta_json,
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with StagedFiles(out) as data, StagedFiles(out) as rest:

        def stage(staged: StagedFiles, name: str, write: Callable[[Path], object]) -> None:
            try:
                write(staged.stage(name))
            except OSError as e:
                raise write_error(e, out / name) from e

        def safetensors(ts: Mapping[str, Any]) -> Callable[[Path], object]:
            return lambda path: write_safetensors(path, ts, {"format": FORMAT}, atomic=False)

        if len(shards) == 1:
            stage(data, FROZEN_FILE, safetensors(tensors))
            new_frozen = {FROZEN_FILE}
        else:
            names = shard_names(FROZEN_STEM, len(shards))
            for file, keys in zip(names, shards):
                stage(data, file, safetensors({k: tensors[k] for k in keys}))
            index = {"metadata": {"total_size": sum(_nbytes(a) for a in tensors.values())},
                     "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
            stage(data, FROZEN_INDEX_FILE, lambda path: path.write_text(json.dumps(index, indent=2, sort_keys=True)))
            new_frozen = set(names)
        stage(rest, LORA_FILE, safetensors(lora_tensors))
        stage(rest, CONFIG_FILE, lambda path: cfg.to_json_file(str(path)))
        stage(rest, META_FILE, lambda path: path.write_text(json.dumps(meta, indent=2, sort_keys=True)))
        data.commit()
        if len(shards) == 1:  # the loader prefers the index: drop an old one before the rest lands
            (out / FROZEN_INDEX_FILE).unlink(missing_ok=True)
        rest.commit()
    stale = [p for p in out.iterdir() if (p.name == FROZEN_FILE or _SHARD_RE.match(p.name)) and p.name not in new_frozen]
    for p in stale:
        p.unlink(missing_ok=True)
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, out)
    return out


class QuantizedCheckpoint:
    """A saved quantized model, read lazily: tensors are loaded on demand.

    Opening reads ``apiq_meta.json``, ``config.json`` and the safetensors headers only, and
    checks the structure (every parameter present with its shape, LoRA factors matching
    their weights). :meth:`tensor`, :meth:`layer_params`, :meth:`non_layer_params` and
    :meth:`lora_layer` read just what they return (``safetensors.safe_open`` reads only the
    requested tensors); :attr:`tensors_read` and :attr:`bytes_read` count what was read.

    Attributes:
      path: the directory.
      model_config: the :class:`ModelConfig` of ``config.json``.
      metadata: the user metadata saved with the model.
      lora_config: the saved :class:`~apiq_jax.lora.LoraConfig`, or None.
      files: the frozen safetensors files (one, or the shards).
      tensors_read: tensors read so far (frozen and LoRA).
      bytes_read: their bytes.

    Example:
      >>> import tempfile, jax
      >>> from apiq_jax import LoraConfig, QuantConfig, load_pretrained, quantize_model, save_quantized
      >>> from apiq_jax.demo_data import DEMO_MODEL_DIR
      >>> model = load_pretrained(DEMO_MODEL_DIR)
      >>> frozen, lora = quantize_model(model.params, QuantConfig(bits=2, group_size=64),
      ...                               LoraConfig(rank=8), key=jax.random.key(0))
      >>> out = save_quantized(tempfile.mkdtemp(), frozen, lora, model.config, max_shard_size="100KB")
      >>> ckpt = QuantizedCheckpoint(out)
      >>> len(ckpt.files) > 1, ckpt.tensors_read
      (True, 0)
      >>> layer = ckpt.layer_params(1)      # reads layer 1's tensors only
      >>> layer["q_proj"].shape == frozen["layers"][1]["q_proj"].shape
      True
      >>> ckpt.tensors_read == len([k for k in ckpt.keys() if k.startswith("layers.1.")])
      True
    """

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"quantized model directory not found: {p}")
        meta_path = p / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found; {p} is not a saved apiq-jax quantized model")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format={meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: version={meta.get('version')!r}, this library reads version {VERSION}")
        quantized = meta.get("quantized")
        if not isinstance(quantized, dict):
            raise ValueError(
                f"{meta_path}: no 'quantized' entry (the QuantizedTensor metadata by name), got {quantized!r}; "
                "the file is incomplete or not written by save_quantized"
            )
        self.path = p
        self.model_config = load_config(p)  # errors name the config.json
        self.metadata: dict[str, Any] = dict(meta.get("metadata") or {})
        self._quantized: dict[str, dict[str, Any]] = quantized
        try:
            self.lora_config = None if meta.get("lora_config") is None else LoraConfig.from_dict(meta["lora_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: bad lora_config {meta.get('lora_config')!r}: {e}") from e
        self.tensors_read = 0
        self.bytes_read = 0
        self._open_frozen()
        self._open_lora()

    # --- opening: headers and structure ------------------------------------------------------

    def _open_frozen(self) -> None:
        p = self.path
        index_path = p / FROZEN_INDEX_FILE
        self._frozen: dict[str, tuple[Path, TensorInfo]] = {}
        if index_path.is_file():
            self._source = index_path
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                ok = isinstance(weight_map, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and Path(v).name == v for k, v in weight_map.items())
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path} is not a safetensors index ({{'weight_map': {{key: file}}}}): {e}") from e
            if not ok:
                raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names in {p}")
            by_file: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                by_file.setdefault(file, []).append(key)
            for file, keys in by_file.items():
                infos = self._header(p / file, f"listed in {index_path.name}")
                missing = [k for k in keys if k not in infos]
                if missing:
                    raise ValueError(f"{p / file}: no tensors {missing[:8]} (listed in {index_path.name})")
                self._frozen.update({k: (p / file, infos[k]) for k in keys})
            self.files = tuple(p / f for f in sorted(by_file))
        else:
            self._source = p / FROZEN_FILE
            infos = self._header(self._source, "a saved quantized model needs it")
            self._frozen = {k: (self._source, info) for k, info in infos.items()}
            self.files = (self._source,)

        # parameter name -> {sub name: key} (quantized) or {"": key} (plain)
        params: dict[str, dict[str, str]] = {}
        claimed: set[str] = set()
        for name in self._quantized:
            prefix = name + "."
            sub = {k[len(prefix):]: k for k in self._frozen if k.startswith(prefix)}
            if "codes" not in sub:
                raise ValueError(f"{self._source}: no '{name}.codes' for quantized linear {name!r}")
            params[name] = sub
            claimed.update(sub.values())
        params.update({k: {"": k} for k in self._frozen if k not in claimed})
        self._params = params
        shapes = {}
        for name, sub in params.items():
            if "" in sub:
                shapes[name] = jax.ShapeDtypeStruct(self._frozen[sub[""]][1].shape, jnp.float32)
            else:
                try:
                    shapes[name] = jax.ShapeDtypeStruct(tuple(int(s) for s in self._quantized[name]["shape"]),
                                                        jnp.float32)
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{self._source}: cannot rebuild {name!r}: bad metadata "
                                     f"{self._quantized[name]!r} ({e})") from e
        try:
            check_params(unflatten_params(shapes), self.model_config)
        except ValueError as e:
            raise ValueError(f"{self._source}: {e}") from e

    def _open_lora(self) -> None:
        self._lora: dict[str, tuple[Path, TensorInfo]] = {}
        if self.lora_config is None:
            return
        file = self.path / LORA_FILE
        infos = self._header(file, "a saved quantized model needs it")
        self._lora = {k: (file, info) for k, info in infos.items()}
        try:
            factors = unflatten_params({k: info.shape for k, info in infos.items()})
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e
        extra = sorted(set(factors) - {"layers"})
        if extra:
            raise ValueError(f"{file}: unexpected entries {extra[:8]} (only 'layers.<i>.<linear>.a/b')")
        layers = factors.get("layers", [])
        n = self.model_config.num_hidden_layers
        if len(layers) != n:
            raise ValueError(f"{file}: LoRA for {len(layers)} layers, model has {n}")
        weights = param_shapes(self.model_config)
        r = self.lora_config.rank
        for i, layer in enumerate(layers):
            if set(layer) != set(self.lora_config.targets):
                raise ValueError(
                    f"{file}: layer {i} has LoRA for {sorted(layer)}, "
                    f"lora_config targets {list(self.lora_config.targets)}"
                )
            for lin, ab in layer.items():
                out_f, in_f = weights[f"layers.{i}.{lin}"]
                if not isinstance(ab, dict) or set(ab) != {"a", "b"}:
                    found = sorted(ab) if isinstance(ab, dict) else "a tensor"
                    raise ValueError(f"{file}: layer {i} {lin}: LoRA entries {found}, expected ['a', 'b']")
                for part, expected in (("a", (in_f, r)), ("b", (r, out_f))):
                    if tuple(ab[part]) != expected:
                        raise ValueError(
                            f"{file}: layer {i} {lin}: LoRA factor {part} has shape {list(ab[part])}, expected "
                            f"{list(expected)} (weight [out, in] = {[out_f, in_f]}, rank {r})"
                        )

    @staticmethod
    def _header(file: Path, why: str) -> dict[str, TensorInfo]:
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found ({why})")
        return read_header(file)[0]

    # --- reading -------------------------------------------------------------------------------

    def _read(self, keys: list[str], table: Mapping[str, tuple[Path, TensorInfo]]) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(table[k][0], []).append(k)
        out: dict[str, np.ndarray] = {}
        for file, ks in by_file.items():
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k)
                        self.tensors_read += 1
                        self.bytes_read += table[k][1].nbytes
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot read {file} as safetensors: {e}") from e
        return out

    def reset_counts(self) -> None:
        """Set :attr:`tensors_read` and :attr:`bytes_read` back to 0.

        Returns:
          None.
        """
        self.tensors_read = 0
        self.bytes_read = 0

    @property
    def num_layers(self) -> int:
        """The number of decoder layers."""
        return self.model_config.num_hidden_layers

    def keys(self) -> list[str]:
        """The names of the stored frozen tensors (``"layers.3.q_proj.codes"``, ``"norm"``, ...).

        Returns:
          The names, in file order.
        """
        return list(self._frozen)

    def tensor_info(self, key: str) -> TensorInfo:
        """Dtype, shape and size of a stored frozen tensor, from the header (nothing is read).

        Args:
          key: a name of :meth:`keys`.

        Returns:
          Its :class:`~apiq_jax.models.safetensors_io.TensorInfo`.

        Raises:
          KeyError: an unknown name.
        """
        if key not in self._frozen:
            raise KeyError(f"no frozen tensor {key!r} in {self.path}")
        return self._frozen[key][1]

    def tensor(self, key: str) -> np.ndarray:
        """Read one stored frozen tensor (a packed-code array for ``"....codes"``).

        Args:
          key: a name of :meth:`keys`.

        Returns:
          The tensor as a host numpy array.

        Raises:
          KeyError: an unknown name.
        """
        self.tensor_info(key)
        return self._read([key], self._frozen)[key]

    def _build(self, names: list[str], strip: str) -> Params:
        keys = [k for n in names for k in self._params[n].values()]
        arrays = self._read(keys, self._frozen)
        flat: dict[str, Any] = {}
        for name in names:
            sub = self._params[name]
            if "" in sub:
                flat[name[len(strip):]] = jnp.asarray(arrays[sub[""]])
                continue
            try:
                flat[name[len(strip):]] = QuantizedTensor.from_state_dict(
                    {s: arrays[k] for s, k in sub.items()}, self._quantized[name])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self._source}: cannot rebuild {name!r}: {e}") from e
        return unflatten_params(flat)

    def _check_layer(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_layers:
            raise ValueError(f"layer index {i!r} is out of range; accepted: 0 <= i < {self.num_layers}")

    def layer_params(self, i: int) -> dict[str, Any]:
        """Read one decoder layer's params (and nothing else).

        Args:
          i: the layer index, ``0 <= i < num_layers``.

        Returns:
          ``params["layers"][i]`` of the saved model: ``{"q_proj": QuantizedTensor, ...,
          "input_layernorm": array, ...}``.

        Raises:
          ValueError: an index out of range, or a tensor that cannot be rebuilt.
        """
        self._check_layer(i)
        prefix = f"layers.{int(i)}."
        return self._build([n for n in self._params if n.startswith(prefix)], prefix)

    def non_layer_params(self) -> dict[str, Any]:
        """Read the params outside the decoder layers.

        Returns:
          ``{"embed_tokens", "norm"}`` and ``"lm_head"`` when the embeddings are not tied.
        """
        return self._build([n for n in self._params if not n.startswith("layers.")], "")

    def frozen(self) -> Params:
        """Read every frozen param.

        Returns:
          The params pytree, as :func:`load_quantized` returns it.
        """
        params = self.non_layer_params()
        params["layers"] = [self.layer_params(i) for i in range(self.num_layers)]
        return params

    def lora_layer(self, i: int) -> Lora | None:
        """Read one layer's LoRA factors.

        Args:
          i: the layer index, ``0 <= i < num_layers``.

        Returns:
          ``lora["layers"][i]`` (a :class:`~apiq_jax.lora.Lora` of ``{linear: {"a", "b"}}``
          with the saved config), or None when no LoRA was saved.

        Raises:
          ValueError: an index out of range.
        """
        self._check_layer(i)
        if self.lora_config is None:
            return None
        prefix = f"layers.{int(i)}."
        arrays = self._read([k for k in self._lora if k.startswith(prefix)], self._lora)
        return Lora(unflatten_params({k[len(prefix):]: jnp.asarray(v) for k, v in arrays.items()}), self.lora_config)

    def lora(self) -> Lora | None:
        """Read every LoRA factor.

        Returns:
          The :class:`~apiq_jax.lora.Lora` (with its config), or None when none was saved.
        """
        if self.lora_config is None:
            return None
        arrays = self._read(list(self._lora), self._lora)
        return Lora(unflatten_params({k: jnp.asarray(v) for k, v in arrays.items()}), self.lora_config)

    def load(self) -> tuple[Params, Lora | None, ModelConfig, dict[str, Any]]:
        """Read everything.

        Returns:
          ``(frozen, lora, model_config, metadata)`` as :func:`load_quantized`.
        """
        return self.frozen(), self.lora(), self.model_config, dict(self.metadata)


def load_quantized(
    path: str | os.PathLike,
) -> tuple[Params, Lora | None, ModelConfig, dict[str, Any]]:
    """Read a directory written by :func:`save_quantized` (one file or shards).

    Args:
      path: the directory.

    Returns:
      ``(frozen, lora, model_config, metadata)``; ``lora`` (a :class:`~apiq_jax.lora.Lora`
      carrying its config) is None when none was saved.

    Raises:
      FileNotFoundError: missing files.
      ValueError: inconsistent contents, naming the file and key.
    """
    return QuantizedCheckpoint(path).load()
