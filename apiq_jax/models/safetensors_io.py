"""A streaming safetensors writer, a header reader, atomic file staging and shard planning.

Why our own writer: the ``safetensors`` Python API serialises a whole dict of host arrays at
once (``save_file`` needs every tensor as a numpy array in memory, and builds the file in one
buffer), so saving a 20 GB quantized model would need a second 20 GB copy on the host. The
format is simple: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8 bytes), then the raw little-endian bytes of the
tensors back to back. :func:`write_safetensors` computes the header from the shapes and
dtypes alone, then converts one tensor at a time to host bytes, writes it and drops it
(on CPU the conversion is zero-copy). The files it writes are read by the real
``safetensors.safe_open`` and ``safetensors.numpy.load_file`` (tests check it, bit for bit).

Reading goes through ``safetensors.safe_open`` (it reads only the requested tensor);
:func:`read_header` parses a header without touching the data, for planning and accounting.

:class:`StagedFiles` writes files under temporary names in their target directory and renames
them into place together once all of them are complete, so a failed save leaves the previous
files intact and never leaves a half-written file under a final name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

#: numpy dtype name -> safetensors dtype code.
DTYPES: dict[str, str] = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_MAX_HEADER = 100_000_000  # the limit of the safetensors reader
_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")
_ACCEPTED_SIZES = ("a positive int of bytes, or a string such as '2GB', '500MB', '1.5GiB', '1000000' "
                   "(units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header.

    Attributes:
      dtype: the safetensors dtype code ("U32", "BF16", ...).
      shape: the tensor's shape.
      offsets: ``(begin, end)`` byte offsets relative to the start of the data section.
    """

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.offsets[1] - self.offsets[0]


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors dtype code of a numpy/JAX dtype.

    Args:
      dtype: anything ``np.dtype`` accepts (``jnp.bfloat16`` included).

    Returns:
      The code, e.g. ``"F32"`` or ``"BF16"``.

    Raises:
      ValueError: a dtype safetensors cannot store.

    Example:
      >>> import jax.numpy as jnp
      >>> safetensors_dtype(jnp.bfloat16), safetensors_dtype("uint32")
      ('BF16', 'U32')
    """
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} cannot be stored in safetensors; accepted: {sorted(DTYPES)}")
    return DTYPES[name]


def parse_size(value: int | str) -> int:
    """A size in bytes from an int or a string such as ``"2GB"`` or ``"500MB"``.

    As Hugging Face: ``KB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/
    ``TiB`` powers of 1024 (units are case-insensitive; a bare number is bytes).

    Args:
      value: a positive int, or a number followed by an optional unit.

    Returns:
      The size in bytes (> 0).

    Raises:
      ValueError: anything else, naming the value and the accepted forms.

    Example:
      >>> parse_size("2GB"), parse_size("1.5 MiB"), parse_size(4096)
      (2000000000, 1572864, 4096)
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value > 0:
            return int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value.lower())
        if m and m.group(2) in ("", *_UNITS):
            size = int(float(m.group(1)) * _UNITS[m.group(2) or "b"])
            if size > 0:
                return size
    raise ValueError(f"max_shard_size={value!r} is not a size; accepted: {_ACCEPTED_SIZES}")


def shard_names(stem: str, n: int) -> list[str]:
    """Hugging Face shard file names: ``stem-00001-of-00003.safetensors``, ...

    Args:
      stem: the name before the numbers (``"frozen"``).
      n: the number of shards (>= 1).

    Returns:
      The ``n`` file names, in order.
    """
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def plan_shards(groups: Sequence[Sequence[tuple[str, int]]], max_bytes: int) -> list[list[str]]:
    """Split tensors into shards of at most ``max_bytes``, keeping each group in one shard.

    Groups (e.g. the tensors of one decoder layer) are packed in order; a group starts a new
    shard when it does not fit in the current one. A group larger than ``max_bytes`` is split
    tensor by tensor; a single tensor larger than ``max_bytes`` gets a shard of its own (as
    in Hugging Face).

    Args:
      groups: ``[[(name, nbytes), ...], ...]`` in file order.
      max_bytes: the shard size limit in bytes (> 0).

    Returns:
      The tensor names of each shard (at least one shard, possibly empty).

    Example:
      >>> plan_shards([[("a", 4), ("b", 4)], [("c", 6)], [("d", 9), ("e", 9)]], 10)
      [['a', 'b'], ['c'], ['d'], ['e']]
    """
    shards: list[list[str]] = [[]]
    size = 0

    def add(name: str, nbytes: int) -> None:
        nonlocal size
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    for group in groups:
        total = sum(n for _, n in group)
        if shards[-1] and size + total > max_bytes:
            shards.append([])
            size = 0
        if total <= max_bytes:
            shards[-1].extend(name for name, _ in group)
            size += total
        else:
            for name, nbytes in group:
                add(name, nbytes)
    return shards


def to_host(x: Any) -> np.ndarray:
    """``x`` as a contiguous little-endian numpy array, without caching a copy on ``x``.

    A JAX array on an accelerator is copied to a temporary CPU array first: ``np.asarray``
    on it would keep the host copy alive inside the array (JAX caches it) for as long as the
    array lives. A JAX array on the CPU is viewed without a copy.

    Args:
      x: a JAX or numpy array (or anything ``np.asarray`` accepts).

    Returns:
      The numpy array.
    """
    if isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()):
        try:
            x = jax.device_put(x, jax.devices("cpu")[0])
        except RuntimeError:  # no CPU backend (JAX_PLATFORMS excludes it): np.asarray caches
            pass
    arr = np.asarray(x)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def _spec(name: str, x: Any) -> tuple[Any, str, tuple[int, ...], int]:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"tensor name {name!r} is not accepted; names are non-empty strings other than '__metadata__'")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    code = safetensors_dtype(x.dtype)
    shape = tuple(int(s) for s in x.shape)
    return x, code, shape, math.prod(shape) * _ITEMSIZE[code]


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    atomic: bool = True,
) -> int:
    """Write ``tensors`` as a safetensors file, one tensor in host memory at a time.

    The header is computed from shapes and dtypes; the tensors are then converted to host
    bytes (:func:`to_host`) and written one by one, widest dtype first (so every tensor is
    aligned to its item size, as the reference writer does).

    Args:
      path: the file to write.
      tensors: ``{name: array}`` (JAX or numpy arrays; any dtype of :data:`DTYPES`).
      metadata: ``{str: str}`` stored under ``"__metadata__"``.
      atomic: write to a temporary name in the same directory and rename once complete
        (False: write ``path`` directly, for a caller that stages files itself).

    Returns:
      The number of data bytes written (the sum of the tensors' sizes).

    Raises:
      ValueError: a bad name, metadata that is not ``{str: str}`` or an unsupported dtype.
      OSError: the write failed (disk full, file size limit, ...), naming ``path``; with
        ``atomic`` nothing is left under ``path`` or a temporary name.

    Example:
      >>> import tempfile, numpy as np
      >>> from safetensors.numpy import load_file
      >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
      >>> write_safetensors(p, {"w": np.arange(6, dtype=np.uint32).reshape(2, 3)}, {"k": "v"})
      24
      >>> load_file(p)["w"].tolist()
      [[0, 1, 2], [3, 4, 5]]
    """
    path = Path(path)
    if atomic:
        with StagedFiles(path.parent) as staged:
            n = write_safetensors(staged.stage(path.name), tensors, metadata, atomic=False)
            staged.commit()
        return n
    md = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise ValueError(f"safetensors metadata must be {{str: str}}, got {md!r}")
    specs = [(name, *_spec(name, x)) for name, x in tensors.items()]
    specs.sort(key=lambda s: -_ITEMSIZE[s[2]])  # stable: widest first, given order otherwise
    header: dict[str, Any] = {"__metadata__": md} if md else {}
    offset = 0
    for name, _, code, shape, nbytes in specs:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, x, code, shape, nbytes in specs:
                arr = to_host(x)
                if arr.shape != shape or safetensors_dtype(arr.dtype) != code:
                    raise ValueError(f"tensor {name!r} became {arr.dtype}{list(arr.shape)} on the host, "
                                     f"expected {code}{list(shape)}")
                if nbytes:
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                del arr
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(e, path) from e
    return offset


def write_error(e: OSError, path: str | os.PathLike) -> OSError:
    """An OSError saying that writing ``path`` failed, with the errno and reason of ``e``.

    Args:
      e: the error raised by the write (its ``__cause__`` is used when it has one: the
        original error of a nested write).
      path: the file to name (the final name, not a temporary one).

    Returns:
      ``OSError(errno, "writing PATH failed: reason")`` (to raise ``from e``).
    """
    cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
    msg = f"writing {path} failed: {cause.strerror or cause}"
    return OSError(cause.errno, msg) if cause.errno is not None else OSError(msg)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and metadata of a safetensors file, reading only its header.

    Args:
      path: the file.

    Returns:
      ``({name: TensorInfo}, metadata)``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a valid safetensors file (``"cannot read PATH as safetensors: ..."``).

    Example:
      >>> import tempfile, numpy as np
      >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
      >>> _ = write_safetensors(p, {"w": np.zeros((2, 3), np.float32)})
      >>> read_header(p)[0]["w"]
      TensorInfo(dtype='F32', shape=(2, 3), offsets=(0, 24))
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> ValueError:
        return ValueError(f"cannot read {path} as safetensors: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"file of {size} bytes has no 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise bad(f"header length {n} does not fit the file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not {str: str}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (code in _ITEMSIZE and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"bad entry for tensor {name!r}: {entry!r}")
        if end - begin != math.prod(shape) * _ITEMSIZE[code]:
            raise bad(f"tensor {name!r}: {end - begin} bytes for {code}{list(shape)}")
        infos[name] = TensorInfo(code, shape, (begin, end))
    expected = 0
    for name, info in sorted(infos.items(), key=lambda kv: kv[1].offsets):
        if info.offsets[0] != expected:
            raise bad(f"tensor {name!r} starts at {info.offsets[0]}, expected {expected}")
        expected = info.offsets[1]
    if 8 + n + expected != size:
        raise bad(f"data section of {size - 8 - n} bytes, the header describes {expected}")
    return infos, dict(metadata)


class StagedFiles:
    """Files written under temporary names in one directory, renamed into place together.

    Use as a context manager: :meth:`stage` gives the temporary path to write a final name
    to, :meth:`commit` renames every staged file (in staging order) once all are complete;
    leaving the block without committing (an error) deletes the temporary files, so the
    previous files under the final names are untouched.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> with StagedFiles(d) as staged:
      ...     _ = staged.stage("a.txt").write_text("new")
      ...     [p.name for p in staged.commit()]
      ['a.txt']
      >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
      ('new', ['a.txt'])
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, name: str) -> Path:
        """A temporary path in the directory for the final file ``name``.

        Args:
          name: the final file name (no directory part).

        Returns:
          The temporary path (a hidden name ending in ``.tmp``) to write to.
        """
        if Path(name).name != name:
            raise ValueError(f"staged file name {name!r} must be a plain file name")
        tmp = self.directory / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        self._staged.append((tmp, self.directory / name))
        return tmp

    def commit(self) -> list[Path]:
        """Rename every staged file to its final name (each rename is atomic).

        Returns:
          The final paths, in staging order.
        """
        done = []
        while self._staged:
            tmp, final = self._staged[0]
            os.replace(tmp, final)
            self._staged.pop(0)
            done.append(final)
        _fsync_dir(self.directory)
        return done

    def discard(self) -> None:
        """Delete the staged files not yet committed.

        Returns:
          None.
        """
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
