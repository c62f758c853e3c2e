"""Helpers shared by the ``apiq-jax`` subcommands.

Every command module in :mod:`apiq_jax.commands` imports what it shares with the others
from here (never from :mod:`apiq_jax.cli`): the ``--backend`` argument and the backend
context, the data loader for ``--data``/``--eval``, the JSON summary line, the defaults
shared by several commands, and :func:`run_command`, which turns errors a user can fix
into one ``apiq-jax <cmd>: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: window length when --seqlen is not given (capped by the model's max_position_embeddings)
DEFAULT_SEQLEN = 2048
#: exceptions reported as one line + exit code 2 (errors a user can fix: paths, inputs)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
#: exit code of a user error (as argparse's own usage errors)
USER_ERROR_EXIT = 2


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``: a CLI default read from its one source.

    Args:
        cls: a dataclass (e.g. apiq_jax.training.FinetuneConfig).
        name: the field.

    Returns:
        The field's default value.

    Raises:
        KeyError: ``cls`` has no such field, or it has no plain default.
    """
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func(args)``; user errors become one stderr line.

    Args:
        args: parsed arguments with ``command`` (its name) and ``func`` (its runner).

    Returns:
        The runner's exit code (0 when it returns None), or :data:`USER_ERROR_EXIT`
        after printing ``apiq-jax <command>: error: <message>`` to stderr for
        the exceptions in :data:`USER_ERRORS` (no traceback).
    """
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"apiq-jax {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


def print_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as one JSON line on stdout (the last line every command prints).

    Args:
        obj: a JSON-able dict.

    Returns:
        None.
    """
    print(json.dumps(obj), flush=True)


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--backend`` (low-bit matmul backend) to a command that runs a quantized model.

    Args:
        p: the command's parser.

    Returns:
        None; the argument is added to ``p``.
    """
    p.add_argument("--backend", default=None, choices=("auto", "pallas", "xla", "interpret"),
                   help="low-bit matmul backend for quantized weights (default: $APIQ_QMATMUL_BACKEND or "
                        "auto = Pallas kernels on GPU/TPU, XLA on CPU)")


def compute_backend(name: str | None) -> tuple[str, Callable[[Any], Any]]:
    """The qmatmul backend a command runs with, and the params preparer that goes with it.

    The preparer lays quantized weights out for the kernels once when the Pallas kernels
    run (apiq_jax.qmatmul.prepare_params) and is the identity otherwise. The resolved name
    is passed as the static backend= argument of the library's entry points.

    Args:
        name: --backend value; None means $APIQ_QMATMUL_BACKEND, else "auto".

    Returns:
        (resolved backend name, preparer).

    Raises:
        ValueError: an unknown name, or "pallas" without a GPU/TPU.
    """
    from apiq_jax.qmatmul import prepare_params, resolve_backend

    resolved = resolve_backend(name)
    return resolved, (prepare_params if resolved == "pallas" else (lambda params: params))


def load_token_data(
    data: Path, flag: str, *, model_dir: Path, seqlen: int | None, max_len: int, vocab_size: int,
) -> np.ndarray:
    """Scoring/training windows ``[n, seqlen]`` of a ``--data``/``--eval`` file.

    ``.npy`` 2-D rows are used as they are (``seqlen`` must then equal their length or be
    None); 1-D ids and ``.txt`` text (tokenized with ``model_dir``'s tokenizer) are cut into
    non-overlapping windows, the tail dropped.

    Args:
        data: the file.
        flag: the option naming it in error messages (``--data``, ``--eval``).
        model_dir: model directory whose tokenizer reads text.
        seqlen: window length; None means ``min(DEFAULT_SEQLEN, max_len)``.
        max_len: the model's ``max_position_embeddings``.
        vocab_size: the model's vocabulary size (every id is checked against it).

    Returns:
        int32 ids ``[n, seqlen]``.

    Raises:
        FileNotFoundError, ValueError: see :mod:`apiq_jax.data`; a ``--seqlen`` that differs
            from the row length of 2-D ids; an id out of range.
    """
    from apiq_jax import data as D

    name = f"{flag} {data}"
    ids = D.load_tokens(data, tokenizer=model_dir, name=name)
    if ids.ndim == 2:
        if seqlen is not None and seqlen != ids.shape[1]:
            raise ValueError(
                f"--seqlen {seqlen} differs from the row length {ids.shape[1]} of {data}; omit --seqlen "
                "for 2-D ids"
            )
        window = ids.shape[1]
        if window < 2:
            raise ValueError(f"{name}: rows of {window} token; need >= 2 tokens per row")
    else:
        window = seqlen if seqlen is not None else min(DEFAULT_SEQLEN, max_len)
    try:
        D.check_ids(ids, vocab_size)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if ids.ndim == 2:
        return ids.astype(np.int32)
    return D.split_windows(ids, window, name=name)
