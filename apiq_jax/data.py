"""Reading token data: text and ``.npy`` id files in, int32 windows ``[n, seqlen]`` out.

Every command reads its data through this module, so the accepted formats and their
errors are the same everywhere:

* ``.txt``: raw UTF-8 text (other bytes are refused), tokenized once with the model's
  tokenizer including its special tokens (a leading BOS for Llama tokenizers);
* ``.npy``: integer token ids, 1-D (a stream cut into windows) or 2-D (``[n, seqlen]``
  rows used as they are). Pickled object arrays, floats and other ranks are refused.

:func:`windows` is the one-call entry point; :func:`load_tokens`, :func:`tokenize`,
:func:`split_windows`, :func:`sample_windows` and :func:`check_ids` are its parts.
Errors a user can fix raise ValueError (FileNotFoundError for a missing file) with a
message that starts with ``name`` (the file, or how the caller calls it, e.g. a flag).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECK_BLOCK", "DATA_SUFFIXES", "check_ids", "data_suffix", "load_ids", "load_tokenizer", "load_tokens",
    "read_text", "sample_windows", "split_windows", "token_cache_path", "tokenize", "training_windows", "windows",
]

#: file types :func:`load_tokens` reads
DATA_SUFFIXES = (".npy", ".txt")
#: :func:`check_ids` reads memory-mapped ids in blocks of about this many values
CHECK_BLOCK = 1 << 22


def _prefix(name: str | None, path: Path) -> str:
    return name if name is not None else str(path)


def data_suffix(path: str | os.PathLike, *, name: str | None = None) -> str:
    """The lower-case suffix of an existing data file, checked against :data:`DATA_SUFFIXES`.

    Args:
        path: the file.
        name: how error messages call the file (default: the path itself).

    Returns:
        ``".npy"`` or ``".txt"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: any other suffix.
    """
    path = Path(path)
    prefix = _prefix(name, path)
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}: file not found")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(
            f"{prefix}: unsupported file type {suffix or '(none)'!r}; accepted: "
            ".npy (int token ids, [n, seqlen] or 1-D) or .txt (raw text)"
        )
    return suffix


def load_ids(path: str | os.PathLike, *, name: str | None = None, mmap: bool = False) -> np.ndarray:
    """Integer token ids from a ``.npy`` file, 1-D or 2-D, as stored.

    Args:
        path: the ``.npy`` file.
        name: how error messages call the file (default: the path itself).
        mmap: memory-map the file read-only (``np.load(mmap_mode="r")``) instead of
            reading it: rows are read from disk when indexed, nothing is held whole.

    Returns:
        The array (its integer dtype unchanged; a read-only ``np.memmap`` with ``mmap``).

    Raises:
        ValueError: the file is not a readable array, holds a pickled object array
            (never unpickled: ``allow_pickle=False``), is not of an integer dtype,
            is not 1-D or 2-D, or holds no ids.
    """
    path = Path(path)
    prefix = _prefix(name, path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ValueError(f"{prefix}: cannot read as a .npy array: {e}") from e
    if magic != b"\x93NUMPY":  # pickles and .npz archives are never loaded
        raise ValueError(f"{prefix}: cannot read as a .npy array: not in the .npy format (np.save writes it)")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Python objects" in str(e):
            raise ValueError(
                f"{prefix}: holds a pickled object array, which is refused (allow_pickle=False); "
                "save integer token ids, e.g. np.save(path, ids.astype(np.int32))"
            ) from e
        raise ValueError(f"{prefix}: cannot read as a .npy array: {e}") from e
    except OSError as e:
        raise ValueError(f"{prefix}: cannot read as a .npy array: {e}") from e
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{prefix}: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{prefix}: expected [n, seqlen] or 1-D ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{prefix}: no token ids (shape {arr.shape})")
    return arr


def read_text(path: str | os.PathLike, *, name: str | None = None) -> str:
    """The text of a ``.txt`` file (UTF-8; other encodings are refused, not guessed).

    Args:
        path: the text file.
        name: how error messages call the file (default: the path itself).

    Returns:
        The file's text.

    Raises:
        ValueError: the file is not UTF-8 or holds only whitespace.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{_prefix(name, path)}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); accepted: "
            "UTF-8 text (convert it first, e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if not text.strip():
        raise ValueError(f"{_prefix(name, path)}: the text file is empty")
    return text


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` from a local model directory (no download).

    Args:
        path: a directory holding ``tokenizer.json`` (or ``tokenizer.model`` / ``vocab.json``).

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: no such directory, or no tokenizer files in it.
        ValueError: transformers cannot read the files.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"no tokenizer files in {p}; expected tokenizer.json (or tokenizer.model / vocab.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot load the tokenizer from {p}: {e}") from e


def check_tokenizer_vocab(tokenizer_dir: str | os.PathLike, vocab_size: int) -> None:
    """Refuse a tokenizer whose vocabulary is larger than the model's (its ids would not fit).

    Args:
        tokenizer_dir: the model directory holding the tokenizer.
        vocab_size: the model's vocabulary size.

    Returns:
        None.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_tokenizer`; a vocabulary larger than
            ``vocab_size``.
    """
    n = len(load_tokenizer(tokenizer_dir))
    if n > vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {n} tokens, more than the model's vocab_size {vocab_size}; "
            "accepted: a tokenizer of at most vocab_size tokens (is it the model's own tokenizer?)"
        )


def _as_tokenizer(tokenizer: Any) -> Any:
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids of ``text``, tokenized once with the tokenizer's special tokens.

    Args:
        text: the text.
        tokenizer: a Hugging Face tokenizer, or a model directory holding one.

    Returns:
        1-D int64 ids (e.g. a leading BOS, then the text's tokens).

    Raises:
        ValueError: ``text`` is not a str; see :func:`load_tokenizer` for a directory.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    enc = _as_tokenizer(tokenizer)(text, add_special_tokens=True, verbose=False)
    return np.asarray(enc["input_ids"], dtype=np.int64)


def load_tokens(path: str | os.PathLike, *, tokenizer: Any = None, name: str | None = None) -> np.ndarray:
    """Token ids from a data file: ``.npy`` ids as stored, ``.txt`` text tokenized.

    Args:
        path: a ``.npy`` or ``.txt`` file.
        tokenizer: a tokenizer or a model directory holding one; loaded only for ``.txt``.
        name: how error messages call the file (default: the path itself).

    Returns:
        1-D ids (text, 1-D ``.npy``) or 2-D ``[n, seqlen]`` rows (2-D ``.npy``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unsupported file, see :func:`data_suffix`, :func:`load_ids`,
            :func:`read_text`; a ``.txt`` file without a tokenizer.
    """
    if data_suffix(path, name=name) == ".npy":
        return load_ids(path, name=name)
    if tokenizer is None:
        raise ValueError(f"{_prefix(name, Path(path))}: text needs a tokenizer (tokenizer=...)")
    return tokenize(read_text(path, name=name), tokenizer)


def check_ids(ids: Any, vocab_size: int) -> np.ndarray:
    """Check that token ids are integers in ``[0, vocab_size)``.

    Args:
        ids: token ids of any shape.
        vocab_size: the model's vocabulary size.

    Returns:
        ``ids`` as a numpy array (dtype unchanged).

    Raises:
        ValueError: a non-integer dtype, or an id out of range; the message names the
            first bad id, its position (an index, or a tuple for 2-D ids) and the accepted
            range, e.g. ``token id 600 at position (0, 2) is out of range for this model;
            accepted: 0 <= id < 512 (vocab_size)``.
    """
    arr = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    # in blocks of rows: a memory-mapped file is scanned, never loaded or masked whole
    rows = arr.reshape(1, -1) if arr.ndim < 2 else arr
    step = max(1, CHECK_BLOCK // max(1, int(np.prod(rows.shape[1:]))))
    for start in range(0, rows.shape[0], step):
        block = np.asarray(rows[start : start + step])
        if block.size and (block.min() < 0 or block.max() >= vocab_size):
            bad = (block < 0) | (block >= vocab_size)
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            value = int(block[where])
            if arr.ndim < 2:
                where = (where[-1],) if arr.ndim == 1 else ()
            else:
                where = (where[0] + start, *where[1:])
            pos: Any = where[0] if len(where) == 1 else where
            raise ValueError(
                f"token id {value} at position {pos} is out of range for this model; "
                f"accepted: 0 <= id < {vocab_size} (vocab_size)"
            )
    return arr


def _check_seqlen(seqlen: Any, minimum: int = 2) -> int:
    if isinstance(seqlen, bool) or not isinstance(seqlen, (int, np.integer)) or seqlen < minimum:
        raise ValueError(f"seqlen={seqlen!r} must be an int >= {minimum}")
    return int(seqlen)


def split_windows(ids: Any, seqlen: int, *, name: str = "ids") -> np.ndarray:
    """Cut a 1-D id stream into non-overlapping windows; the tail is dropped.

    Args:
        ids: 1-D token ids.
        seqlen: tokens per window (>= 2).
        name: how error messages call the ids.

    Returns:
        ``[len(ids) // seqlen, seqlen]`` int32.

    Raises:
        ValueError: not 1-D, a bad ``seqlen``, or fewer than ``seqlen`` ids.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected 1-D token ids, got shape {arr.shape}")
    seqlen = _check_seqlen(seqlen)
    n = arr.size // seqlen
    if n == 0:
        raise ValueError(f"{name}: only {arr.size} tokens, fewer than one window of seqlen {seqlen}")
    return arr[: n * seqlen].reshape(n, seqlen).astype(np.int32)


def sample_windows(ids: Any, nsamples: int, seqlen: int, *, seed: int = 0, name: str = "ids") -> np.ndarray:
    """``nsamples`` windows starting at random positions of a 1-D id stream (overlaps allowed).

    The starts are ``np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, nsamples)``.

    Args:
        ids: 1-D token ids.
        nsamples: number of windows (>= 1).
        seqlen: tokens per window (>= 1).
        seed: seed of the start positions.
        name: how error messages call the ids.

    Returns:
        ``[nsamples, seqlen]`` int32.

    Raises:
        ValueError: not 1-D, a non-positive count or length, or fewer than ``seqlen`` ids.
    """
    stream = np.asarray(ids)
    if stream.ndim != 1:
        raise ValueError(f"{name}: expected 1-D token ids, got shape {stream.shape}")
    seqlen = _check_seqlen(seqlen, 1)
    if isinstance(nsamples, bool) or not isinstance(nsamples, (int, np.integer)) or nsamples <= 0:
        raise ValueError(f"nsamples={nsamples!r} must be a positive int")
    if stream.size < seqlen:
        raise ValueError(
            f"{name}: only {stream.size} tokens, fewer than one window of seqlen {seqlen}; "
            "give more data or a smaller seqlen"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - seqlen + 1, size=nsamples)
    return np.stack([stream[s : s + seqlen] for s in starts]).astype(np.int32)


def _is_path(source: Any) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return (
        isinstance(source, str) and "\n" not in source and len(source) < 4096
        and source.lower().endswith(DATA_SUFFIXES)
    )


def windows(
    source: Any,
    *,
    seqlen: int,
    tokenizer: Any = None,
    nsamples: int | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Token windows ``[n, seqlen]`` from text, a data file or token ids.

    Args:
        source: one of
            * a ``pathlib.Path`` (or a one-line str ending in ``.txt``/``.npy``): a data
              file read with :func:`load_tokens`;
            * any other str: text, tokenized with ``tokenizer``;
            * an array: 1-D ids (a stream) or 2-D ``[n, length]`` rows.
        seqlen: tokens per window (>= 2 for non-overlapping windows of a stream).
        tokenizer: a Hugging Face tokenizer or a model directory holding one; needed
            for text only.
        nsamples: None cuts a stream into non-overlapping windows (the tail dropped; the
            perplexity protocol). A count draws that many windows at random starts
            (overlaps allowed; how calibration data is sampled), seeded with ``seed``.
            For 2-D rows: None keeps every row, a count the first ``nsamples``.
        seed: seed of the random starts (default 0); only with ``nsamples``.

    Returns:
        ``[n, seqlen]`` int32. 2-D rows longer than ``seqlen`` are cut to their first
        ``seqlen`` tokens.

    Raises:
        ValueError: text without a tokenizer, too little data for one window, more
            rows asked for than there are, ``seed`` without ``nsamples``, and the file
            errors of :func:`load_tokens`.
        FileNotFoundError: a data file that does not exist.

    Example:
        >>> import numpy as np
        >>> from apiq_jax.data import windows
        >>> windows(np.arange(10), seqlen=4)
        array([[0, 1, 2, 3],
               [4, 5, 6, 7]], dtype=int32)
        >>> windows(np.arange(10), seqlen=4, nsamples=3, seed=0).shape
        (3, 4)
        >>> from apiq_jax.demo_data import DEMO_MODEL_DIR
        >>> windows("def f(x):\\n    return x\\n" * 8, seqlen=16, tokenizer=DEMO_MODEL_DIR).shape[1]
        16
    """
    if seed is not None and nsamples is None:
        raise ValueError("seed= only applies with nsamples= (random window starts)")
    seqlen = _check_seqlen(seqlen, 1)  # split_windows asks for >= 2 (a next-token target)
    name = "ids"
    if _is_path(source):
        name = str(source)
        arr = load_tokens(source, tokenizer=tokenizer)
    elif isinstance(source, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer (tokenizer=...)")
        name = "text"
        arr = tokenize(source, tokenizer)
    else:
        arr = np.asarray(source)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        rows, length = arr.shape
        if seqlen > length:
            raise ValueError(f"{name}: seqlen {seqlen} exceeds the row length {length}; accepted: seqlen <= {length}")
        n = rows if nsamples is None else nsamples
        if n <= 0 or n > rows:
            raise ValueError(f"{name}: nsamples {n} for {rows} rows; accepted: 1 <= nsamples <= {rows}")
        return np.ascontiguousarray(arr[:n, :seqlen]).astype(np.int32)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected [n, seqlen] or 1-D ids, got shape {arr.shape}")
    if nsamples is None:
        return split_windows(arr, seqlen, name=name)
    return sample_windows(arr, nsamples, seqlen, seed=0 if seed is None else seed, name=name)


def _digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def token_cache_path(text_path: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                     cache_dir: str | os.PathLike) -> Path:
    """Where :func:`training_windows` caches the token ids of a text file.

    The name holds a digest of the text and of the tokenizer files, so a changed text or
    tokenizer gets a new cache file instead of stale ids.

    Args:
        text_path: the ``.txt`` file.
        tokenizer_dir: the directory holding the tokenizer files.
        cache_dir: the cache directory (e.g. beside the output).

    Returns:
        ``cache_dir / "<text stem>.<16 hex digits>.npy"``.
    """
    import hashlib

    h = hashlib.sha256()
    _digest(Path(text_path), h)
    for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json"):
        if (Path(tokenizer_dir) / f).is_file():
            h.update(f.encode())
            _digest(Path(tokenizer_dir) / f, h)
    return Path(cache_dir) / f"{Path(text_path).stem}.{h.hexdigest()[:16]}.npy"


def training_windows(
    path: str | os.PathLike,
    *,
    seqlen: int | None,
    tokenizer_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    vocab_size: int,
    default_seqlen: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Training windows ``[n, seqlen]`` of a data file, memory-mapped rather than loaded.

    * ``.npy`` 2-D ids: the rows as they are (``seqlen`` None or their length);
    * ``.npy`` 1-D ids: non-overlapping windows of ``seqlen`` (the tail dropped);
    * ``.txt``: tokenized once (:func:`tokenize`, the tokenizer of ``tokenizer_dir``) into
      an int32 ``.npy`` in ``cache_dir`` (:func:`token_cache_path`), re-used when the same
      text is given again, then cut like 1-D ids.

    The result is a view of a read-only ``np.memmap``: indexing a batch of rows reads
    those rows, and the ids are checked against ``vocab_size`` block by block.

    Args:
        path: the data file.
        seqlen: window length; for 2-D ids None or their row length.
        tokenizer_dir: model directory whose tokenizer reads text.
        cache_dir: directory for the tokenized text (created when text is first cached).
        vocab_size: the model's vocabulary size.
        default_seqlen: the window length of 1-D ids and text when ``seqlen`` is None.
        name: how error messages call the file (default: the path itself).

    Returns:
        The windows (integer dtype of the file; int32 for text).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file errors of :func:`load_ids` / :func:`read_text`, a ``seqlen``
            that differs from the rows of 2-D ids, too few tokens for one window, an id
            out of range.
    """
    path = Path(path)
    prefix = _prefix(name, path)
    if data_suffix(path, name=name) == ".npy":
        ids = load_ids(path, name=name, mmap=True)
    else:
        cache = token_cache_path(path, tokenizer_dir, cache_dir)
        if not cache.is_file():
            tokens = tokenize(read_text(path, name=name), tokenizer_dir)
            try:
                check_ids(tokens, vocab_size)
            except ValueError as e:
                raise ValueError(f"{prefix}: {e}") from None
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp.npy")
            np.save(tmp, tokens.astype(np.int32))
            os.replace(tmp, cache)  # a killed run leaves no half-written cache
        ids = load_ids(cache, name=name, mmap=True)
    try:
        check_ids(ids, vocab_size)
    except ValueError as e:
        raise ValueError(f"{prefix}: {e}") from None
    if ids.ndim == 2:
        if seqlen is not None and seqlen != ids.shape[1]:
            raise ValueError(
                f"{prefix}: seqlen {seqlen} differs from the row length {ids.shape[1]}; omit it for 2-D ids "
                "(their rows are the windows)"
            )
        if ids.shape[1] < 2:
            raise ValueError(f"{prefix}: rows of {ids.shape[1]} token; need >= 2 tokens per row")
        return ids
    seqlen = default_seqlen if seqlen is None else seqlen
    if seqlen is None:
        raise ValueError(f"{prefix}: 1-D ids and text need a window length (seqlen)")
    seqlen = _check_seqlen(seqlen)
    n = ids.shape[0] // seqlen
    if n == 0:
        raise ValueError(f"{prefix}: only {ids.shape[0]} tokens, fewer than one window of seqlen {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)  # a view: still memory-mapped
