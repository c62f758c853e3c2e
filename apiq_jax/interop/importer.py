"""Import official-ApiQ-style and GPTQ checkpoints into the apiq-jax quantized form.

* :func:`recover_quantized`: a fake-quantized dense weight (``(q - z) * s`` per group, as
  the official ApiQ code saves its base) back to codes, float16 scales and zero points.
  Each group holds at most ``2^bits`` distinct values; the scale is the one that spans
  them with the full code range (``(max - min) / (2^b - 1)`` for "asym", ``absmax /
  (2^(b-1) - 1)`` for "sym"), else the smallest float16 scale that reproduces every value
  exactly; the "asym" zero point puts the smallest value on code 0. The dequantized
  weight is reproduced bit for bit.
* :func:`import_apiq` / :func:`import_gptq`: whole directories to :func:`save_quantized`;
  a GPTQ checkpoint may be sharded (``model.safetensors.index.json``) and hold float16,
  bfloat16 or float32 scales and non-quantized tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np

from apiq_jax.interop.export import ADAPTER_SUBDIR, APIQ_KEY
from apiq_jax.interop.gptq_format import from_gptq
from apiq_jax.interop.peft_io import ADAPTER_CONFIG, load_adapter
from apiq_jax.lora import LINEARS, Lora, LoraConfig, init_lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.hf_io import CONFIG_FILE, INDEX_FILE, all_finite, hf_name, load_config, load_params, read_json
from apiq_jax.models.llama import flatten_params, param_shapes, unflatten_params
from apiq_jax.models.quantized_io import save_quantized
from apiq_jax.quant import QuantConfig, QuantizedTensor
from apiq_jax.quant.tensor import from_codes

SOURCES = ("apiq", "gptq")


def _verify(v: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of groups ``v [G, gs]`` for scales/zeros ``[G]``, and which groups they reproduce exactly."""
    s32 = s.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(v.astype(np.float64) / s32.astype(np.float64)) + z[:, None]
    ok = np.isfinite(q).all(axis=1) & (q >= 0).all(axis=1) & (q <= qmax).all(axis=1)
    q = np.where(np.isfinite(q), q, 0)
    ok &= ((q - z[:, None]).astype(np.float32) * s32 == v).all(axis=1)
    return q.astype(np.int64), ok


def recover_quantized(w: np.ndarray, cfg: QuantConfig, name: str, dtype: str = "float32") -> QuantizedTensor:
    """The :class:`QuantizedTensor` whose dequantized weight is exactly the fake-quantized ``w``.

    Args:
      w: float weight ``[N, K]`` holding at most ``2^bits`` values per group.
      cfg: bits, group size and scheme ("asym" or "sym"; float16 scales, no double quantization).
      name: the linear's name (error messages).
      dtype: the dtype the result dequantizes to.

    Returns:
      The QuantizedTensor (storage layout).

    Raises:
      ValueError: an unsupported config, or a group with more than ``2^bits`` distinct
        values or none that a float16 scale reproduces (naming the layer, row and group).
    """
    if cfg.scheme not in ("asym", "sym") or cfg.double_quant or cfg.scale_dtype != "float16":
        raise ValueError("recovering codes needs scheme 'asym' or 'sym' with float16 scales and no double "
                         f"quantization; got {cfg}")
    w = np.asarray(w, np.float32)
    n, k = w.shape
    gs = cfg.resolve_group_size(k)
    ng = -(-k // gs)
    groups = np.pad(w, ((0, 0), (0, ng * gs - k)), mode="edge").reshape(n * ng, gs)
    srt = np.sort(groups, axis=1)
    distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
    too_many = np.flatnonzero(distinct > 2**cfg.bits)
    if too_many.size:
        row, grp = divmod(int(too_many[0]), ng)
        raise ValueError(
            f"{name}: row {row}, group {grp} holds {int(distinct[too_many[0]])} distinct values, more than "
            f"2^{cfg.bits} = {2**cfg.bits}; the base was not fake-quantized with bits={cfg.bits}, group size {gs} "
            f"({too_many.size} group(s) affected)"
        )
    lo, hi = srt[:, 0].astype(np.float64), srt[:, -1].astype(np.float64)
    qmax = cfg.qmax
    half = 2 ** (cfg.bits - 1) - 1
    if cfg.scheme == "asym":
        s = ((hi - lo) / qmax).astype(np.float16)
        z = -np.rint(lo / np.where(s == 0, 1, s).astype(np.float64))
    else:
        s = (np.maximum(np.abs(lo), np.abs(hi)) / half).astype(np.float16)
        z = np.full(len(groups), float(half))
    s = np.where(s == 0, np.float16(1), s)  # a constant zero group: any scale
    z = np.where(hi == lo, np.where(lo == 0, 0 if cfg.scheme == "asym" else z, z), z)
    q, ok = _verify(groups, s, z, qmax)
    for g in np.flatnonzero(~ok):  # groups that do not span the code range: search the scale
        v = groups[g:g + 1]
        found = False
        span = hi[g] - lo[g] if cfg.scheme == "asym" else max(abs(lo[g]), abs(hi[g]))
        for m in range(qmax, 0, -1):
            sg = np.array([(span or abs(lo[g]) or 1.0) / m]).astype(np.float16)
            zg = np.array([half if cfg.scheme == "sym" else -np.rint(lo[g] / float(sg[0]))])
            qg, okg = _verify(v, sg, zg, qmax)
            if okg[0]:
                s[g], z[g], q[g], found = sg[0], zg[0], qg[0], True
                break
        if not found:
            row, grp = divmod(int(g), ng)
            raise ValueError(f"{name}: row {row}, group {grp}: no float16 scale reproduces its values "
                             f"{np.unique(v).tolist()[:8]} on {cfg.bits}-bit codes with scheme {cfg.scheme!r}")
    codes = q.reshape(n, ng * gs)
    zeros = z.reshape(n, ng) if cfg.scheme == "asym" else None
    return from_codes(codes, s.reshape(n, ng), zeros, (n, k), cfg, dtype)


def _adapter_dir(src: Path, adapter: str | os.PathLike | None) -> Path | None:
    if adapter is not None:
        return Path(adapter)
    for d in (src / ADAPTER_SUBDIR, src):
        if (d / ADAPTER_CONFIG).is_file():
            return d
    return None


def _lora_for(frozen: dict[str, Any], adapter_dir: Path | None, lora_config: LoraConfig, seed: int) -> Lora:
    if adapter_dir is not None:
        return load_adapter(adapter_dir, frozen)
    return init_lora(frozen, lora_config, jax.random.key(seed), method="qlora")


def import_apiq(
    src: str | os.PathLike, out: str | os.PathLike, quant_config: QuantConfig, *,
    adapter: str | os.PathLike | None = None, targets: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """An official-ApiQ-style directory (fake-quantized HF base + peft adapter) -> a quantized directory.

    Args:
      src: the HF base directory (float32 weights; the adapter in ``src/apiq_init`` or ``src``).
      out: the new quantized model directory.
      quant_config: bits, group size and scheme the base was fake-quantized with.
      adapter: the peft adapter directory (default: found in ``src``).
      targets: the linears to recover (default: the adapter's target modules).

    Returns:
      A summary ``{"source", "out", "quantized_linears", "lora_rank"}``.

    Raises:
      FileNotFoundError: a missing base or adapter.
      ValueError: a group that is not fake-quantized with ``quant_config`` (named), a bad
        adapter (shape mismatch named).
    """
    src = Path(src)
    config = load_config(src)
    params = load_params(src, config, "float32")
    adir = _adapter_dir(src, adapter)
    if adir is None:
        raise FileNotFoundError(f"no peft adapter in {src} (looked for {ADAPTER_SUBDIR}/{ADAPTER_CONFIG} and "
                                f"{ADAPTER_CONFIG}); pass --adapter DIR")
    lora = load_adapter(adir, params)
    names = targets or lora.config.targets
    flat = flatten_params(params)
    for key in list(flat):
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] in names:
            flat[key] = recover_quantized(np.asarray(flat[key]), quant_config, key)
    frozen = unflatten_params(flat)
    save_quantized(out, frozen, lora, config, {"imported_from": "apiq"}, tokenizer_source=src)
    return {"source": "apiq", "out": str(out), "quantized_linears": sum(
        isinstance(v, QuantizedTensor) for v in flat.values()), "lora_rank": lora.config.rank}


#: safetensors dtypes of GPTQ ``scales`` that are read (the stored values are kept exactly)
_SCALE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
#: safetensors dtypes of the non-quantized tensors (embeddings, norms, lm_head), read as float32
_DENSE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: safetensors dtypes of the packed ``qweight``/``qzeros`` (the bit layout is of 32-bit words) and of ``g_idx``
_PACKED_DTYPES = frozenset({"I32"})
_GIDX_DTYPES = frozenset({"I32", "I64"})


class _Tensors:
    """The tensors of a safetensors checkpoint directory, read one at a time by key (a context manager).

    Which file holds a key comes from ``model.safetensors.index.json``'s ``weight_map`` (a
    sharded checkpoint, as Hugging Face writes it: every shard it names must be there), else
    from the headers of every ``*.safetensors`` file in the directory.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.index: Path | None = None
        self._stack = contextlib.ExitStack()
        self._files: dict[Path, tuple[Any, set[str]]] = {}
        index = src / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file); not a safetensors "
                                 "index")
            for fname in dict.fromkeys(weight_map.values()):
                if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                    raise ValueError(f"{index}: shard {fname!r} is not a file name inside {src}; paths are not "
                                     "followed")
            missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{index} names {len(missing)} shard(s) missing from {src}: {', '.join(missing[:4])}"
                    f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete (copy or download every shard)"
                )
            self.index = index
            self.where = {k: src / f for k, f in weight_map.items()}
            return
        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {src} (and no {INDEX_FILE})")
        self.where = {}
        try:
            for f in files:
                for key in sorted(self._open(f)[1]):
                    if key in self.where:
                        raise ValueError(f"{src}: tensor {key!r} is in both {self.where[key].name} and {f.name}; "
                                         f"give one checkpoint (or a {INDEX_FILE} saying which file holds what)")
                    self.where[key] = f
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "_Tensors":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _open(self, path: Path) -> tuple[Any, set[str]]:
        """The open handle of ``path`` and the keys it holds."""
        from safetensors import safe_open

        if path not in self._files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot read {path} as safetensors: {e}") from e
            self._files[path] = (handle, set(handle.keys()))
        return self._files[path]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def dtype(self, key: str) -> str:
        """The safetensors dtype code of ``key`` ("F16", "BF16", "I32", ...), from the header."""
        path = self.where[key]
        handle, keys = self._open(path)
        if key not in keys:
            raise ValueError(f"{path} does not hold tensor {key!r} (the index {self.index} says it should)")
        return str(handle.get_slice(key).get_dtype())

    def get(self, key: str, accepted: Collection[str], what: str) -> np.ndarray:
        """Tensor ``key`` as stored, after checking that its dtype is ``accepted`` and a float one is finite."""
        stored = self.dtype(key)
        path = self.where[key]
        if stored not in accepted:
            raise ValueError(f"{path}: {what} {key!r} is stored as {stored}; accepted: {', '.join(sorted(accepted))}")
        try:
            arr = self._open(path)[0].get_tensor(key)  # bfloat16 through ml_dtypes (imported with jax)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read tensor {key!r} from {path}: {e}") from e
        if stored in _DENSE_DTYPES and not all_finite(arr):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or inf values; the checkpoint is damaged "
                             "(re-download or re-convert it)")
        return arr


def _fits_float16(scales: np.ndarray) -> bool:
    """Whether every value converts to float16 and back unchanged."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(scales.astype(np.float16).astype(np.float32), scales.astype(np.float32)))


def import_gptq(
    src: str | os.PathLike, out: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
    lora_config: LoraConfig | None = None, seed: int = 0,
) -> dict[str, Any]:
    """A Hugging Face GPTQ checkpoint (``desc_act: false``, v1 or v2 zeros) -> a quantized directory.

    The checkpoint is one ``model.safetensors`` (or any ``*.safetensors`` files without
    duplicate tensors) or shards listed by ``model.safetensors.index.json`` (its
    ``weight_map`` says which file holds each tensor; files it does not name are not read).
    ``scales`` may be float16, bfloat16 or float32: they are stored as float16 when every
    scale of the checkpoint converts to float16 exactly (then the model exports back to
    GPTQ), else in their own dtype (``scale_dtype`` bfloat16, or float32 for float32 or
    mixed scales), so the imported weights are always the checkpoint's exactly. The
    non-quantized tensors (embeddings, norms, ``lm_head``) are read as float32, which
    holds float16, bfloat16 and float32 values exactly.

    Args:
      src: the GPTQ directory (``config.json`` with ``quantization_config``, safetensors).
      out: the new quantized model directory.
      adapter: a peft adapter to attach (default: ``src/apiq_init`` when present).
      lora_config: without an adapter, a fresh QLoRA-initialised LoRA of this config
        (default rank 64, alpha 16, every linear) so the result is ready for ``finetune``.
      seed: seeds that fresh LoRA.

    Returns:
      A summary ``{"source", "out", "quantized_linears", "lora_rank", "checkpoint_format",
      "scale_dtype", "files"}``.

    Raises:
      FileNotFoundError: missing files, or a shard the index names (all of them listed).
      ValueError: not a GPTQ checkpoint, act-order, an unsupported bit width or format,
        tensors that do not match the config or are stored in a dtype not accepted, NaN or
        inf values, an index that names a file outside ``src`` or a shard without the
        tensor it should hold (each naming the file and tensor).
    """
    src = Path(src)
    raw = read_json(src / CONFIG_FILE)
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise ValueError(f"{src / CONFIG_FILE}: no quantization_config with quant_method 'gptq'")
    if qc.get("desc_act"):
        raise ValueError(f"{src / CONFIG_FILE}: desc_act (act-order) GPTQ checkpoints cannot be imported; "
                         "accepted: desc_act false")
    fmt = qc.get("checkpoint_format", "gptq")
    bits, group_size = int(qc.get("bits", 0)), int(qc.get("group_size", -1))
    scheme = (qc.get(APIQ_KEY) or {}).get("scheme", "asym")
    config: ModelConfig = load_config(src)
    with _Tensors(src) as tensors:
        flat, linears, scale_dtype = _read_gptq(tensors, src, config, bits, group_size, fmt, scheme)
        files = len(set(tensors.where.values()))
    frozen = unflatten_params(flat)
    adir = _adapter_dir(src, adapter)
    targets = tuple(n for n in LINEARS if isinstance(frozen["layers"][0].get(n), QuantizedTensor))
    lora = _lora_for(frozen, adir, lora_config or LoraConfig(targets=targets), seed)
    save_quantized(out, frozen, lora, config,
                   {"imported_from": "gptq", "checkpoint_format": fmt, "scale_dtype": scale_dtype},
                   tokenizer_source=src)
    return {"source": "gptq", "out": str(out), "checkpoint_format": fmt, "lora_rank": lora.config.rank,
            "quantized_linears": linears, "scale_dtype": scale_dtype, "files": files}


def _read_gptq(tensors: _Tensors, src: Path, config: ModelConfig, bits: int, group_size: int, fmt: str,
               scheme: str) -> tuple[dict[str, Any], int, str]:
    """The flat params of a GPTQ checkpoint, the number of quantized linears and the scale dtype kept."""
    shapes = param_shapes(config)
    dense: dict[str, str] = {}  # our name -> HF key of the dense tensors
    linears: dict[str, str] = {}  # our name -> HF key prefix of the GPTQ linears
    for name in shapes:
        key = hf_name(name)
        base = key[: -len(".weight")]
        if key in tensors:
            dense[name] = key
        elif f"{base}.qweight" in tensors:
            linears[name] = base
        else:
            raise ValueError(f"{src}: tensor {key} (or its GPTQ form {base}.qweight) is missing")
    scales = {name: tensors.get(f"{base}.scales", set(_SCALE_DTYPES), "GPTQ scales")
              for name, base in linears.items() if f"{base}.scales" in tensors}
    stored = {tensors.dtype(f"{base}.scales") for name, base in linears.items() if name in scales}
    if stored <= {"F16"} or all(_fits_float16(v) for v in scales.values()):
        scale_dtype = "float16"
    else:
        scale_dtype = _SCALE_DTYPES[stored.pop()] if len(stored) == 1 else "float32"
    flat: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name in dense:
            arr = tensors.get(dense[name], _DENSE_DTYPES, "non-quantized tensor")
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{dense[name]}: shape {tuple(arr.shape)}, the config needs {tuple(shape)}")
            flat[name] = np.asarray(arr, np.float32)
            continue
        base = linears[name]
        arrays = {t: tensors.get(f"{base}.{t}", _GIDX_DTYPES if t == "g_idx" else _PACKED_DTYPES, f"GPTQ {t}")
                  for t in ("qweight", "qzeros", "g_idx") if f"{base}.{t}" in tensors}
        if name in scales:
            arrays["scales"] = scales[name]
        qt = from_gptq(arrays, bits, group_size, fmt, hf_name(name), scheme=scheme, scale_dtype=scale_dtype)
        if tuple(qt.shape) != tuple(shape):
            raise ValueError(f"{base}: GPTQ tensors hold {tuple(qt.shape)}, the config needs {tuple(shape)}")
        flat[name] = qt
    return flat, len(linears), scale_dtype


__all__ = ["SOURCES", "import_apiq", "import_gptq", "recover_quantized"]
