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
import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import apiq_jax.interrupts as interrupts

#: window length when --seqlen is not given (capped by the model's max_position_embeddings)
DEFAULT_SEQLEN = 2048
#: exceptions reported as one line + exit code 2 (errors a user can fix: paths, inputs)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
#: exit code of a user error (as argparse's own usage errors)
USER_ERROR_EXIT = 2
#: exit code after Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED_EXIT = 130
#: errnos of a full disk or a file size limit: reported in one line, the finished work kept
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


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
    """Run the parsed command ``args.func(args)``; user errors and Ctrl-C become one stderr line.

    A command may set ``args.resume_hint`` to a callable returning where a re-run would
    resume (e.g. "block 3/32"); it is read only after an interruption.

    Args:
        args: parsed arguments with ``command`` (its name) and ``func`` (its runner).

    Returns:
        The runner's exit code (0 when it returns None); :data:`USER_ERROR_EXIT` after
        printing ``apiq-jax <command>: error: <message>`` to stderr for the exceptions in
        :data:`USER_ERRORS`, a permission error or a full disk (no traceback);
        :data:`INTERRUPTED_EXIT` after one line saying the run was interrupted (Ctrl-C).
    """
    with interrupts.catch_sigint():
        return _run_catching(args)


def _run_catching(args: argparse.Namespace) -> int:
    """:func:`run_command`'s body, run with Ctrl-C remembered (see :mod:`apiq_jax.interrupts`)."""
    try:
        code = int(args.func(args) or 0)
        if interrupts.requested():  # pressed while the last unit of work ran; its exception was swallowed
            print(f"apiq-jax {args.command}: interrupted after the run had finished (exit code {code}); "
                  "its output is complete", file=sys.stderr)
            return INTERRUPTED_EXIT
        return code
    except KeyboardInterrupt:
        print(f"apiq-jax {args.command}: interrupted; {_resume_text(args)}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except USER_ERRORS as e:
        # a library that failed (orbax on a corrupt checkpoint) may leave coroutines whose
        # collection prints "Exception ignored in ..." tracebacks: the one line says it all
        sys.unraisablehook = lambda unraisable: None
        print(f"apiq-jax {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except PermissionError as e:
        print(f"apiq-jax {args.command}: error: {e} (not writable or readable by this user)", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        print(f"apiq-jax {args.command}: error: {e} (disk full or file size limit); free space and re-run the "
              "same command: the finished work is kept and files already in place were not replaced",
              file=sys.stderr)
        return USER_ERROR_EXIT


def _resume_text(args: argparse.Namespace) -> str:
    """What an interrupted command's re-run does, from its ``resume_hint`` (if any)."""
    hint = getattr(args, "resume_hint", None)
    where = None
    if callable(hint):
        try:
            where = hint()
        except Exception:  # noqa: BLE001 - the hint is best effort; the interruption is what is reported
            where = None
    if where:
        return f"re-running the same command resumes from {where}"
    return "re-running the same command starts it again (nothing was finished yet)"


def check_method_options(method: str, bits: int, sizes: dict[str, int | None]) -> Any:
    """Check ``--method``, ``--bits`` and positive sizes, as ``quantize`` and ``plan`` take them.

    Args:
        method: the --method value.
        bits: the --bits value.
        sizes: ``{dest: value}`` of options that must be positive integers when given.

    Returns:
        The method's :class:`~apiq_jax.calibration.registry.MethodSpec`.

    Raises:
        ValueError: an unknown method, bits it does not take, or a bad size, naming the flag.
    """
    from apiq_jax.calibration import METHODS, get_method

    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not supported; accepted: {', '.join(METHODS)}")
    spec = get_method(method)
    if bits not in spec.bits:
        raise ValueError(
            f"--bits {bits} is not supported by --method {method}; accepted: {', '.join(map(str, spec.bits))}"
        )
    for name, v in sizes.items():
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {v} must be a positive integer")
    return spec


#: glibc ``mallopt`` parameter number of the mmap threshold
_M_MMAP_THRESHOLD = -3
#: allocations at least this big get their own mapping, returned to the OS when freed
RELEASE_ABOVE_BYTES = 1 << 20


def return_freed_host_memory() -> bool:
    """Have host allocations of at least :data:`RELEASE_ABOVE_BYTES` returned to the OS when freed.

    glibc raises its mmap threshold after every large free (up to 32 MiB), after which
    blocks of a few MB come from the heap and stay in the process's RSS once freed: about
    0.3 GB of a block-by-block calibration's peak (benchmarks/RESULTS.md). A fixed threshold
    stops that. Costs a page fault per page of a new large buffer, negligible for programs
    run once per block. No-op where the C library is not glibc.

    Returns:
      Whether the setting was applied.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_ABOVE_BYTES))


def trim_host_memory() -> bool:
    """Return the free pages of every malloc arena to the OS now (glibc's ``malloc_trim(0)``).

    Below :data:`RELEASE_ABOVE_BYTES` freed memory stays in the arenas of the threads that
    used it (XLA's compiler and workers): about 0.2 GB after a calibrated block of a
    2048-wide model. ``quantize`` trims after every block, so the next one starts without
    it. No-op where the C library is not glibc.

    Returns:
      Whether any memory was returned.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _glibc() -> Any:
    """The C library through ctypes when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (AttributeError where not glibc)
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


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


def check_seqlen(seqlen: int, max_len: int, what: str = "--seqlen") -> None:
    """Refuse windows longer than the model's positions.

    Args:
        seqlen: the window length.
        max_len: the model's ``max_position_embeddings``.
        what: how the message calls the length (``--seqlen``, or where it comes from).

    Returns:
        None.

    Raises:
        ValueError: ``seqlen > max_len``.
    """
    if seqlen > max_len:
        raise ValueError(f"{what} {seqlen} exceeds the model's max_position_embeddings {max_len}; accepted: "
                         f"2 <= --seqlen <= {max_len}")


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
    if D.data_suffix(data, name=name) == ".txt":
        D.check_tokenizer_vocab(model_dir, vocab_size)
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
    check_seqlen(window, max_len, "--seqlen" if seqlen is not None else f"the row length of {data}")
    try:
        D.check_ids(ids, vocab_size)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if ids.ndim == 2:
        return ids.astype(np.int32)
    return D.split_windows(ids, window, name=name)


def warn(command: str, message: str) -> None:
    """Print ``apiq-jax <command>: warning: <message>`` on stderr (an unwise but legal option).

    Args:
        command: the command's name.
        message: what is unwise and what it costs.

    Returns:
        None.
    """
    print(f"apiq-jax {command}: warning: {message}", file=sys.stderr, flush=True)


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of the seven linears of a decoder block of ``config``.

    Args:
        config: a :class:`~apiq_jax.models.config.ModelConfig`.

    Returns:
        ``{name: (in_features, out_features)}``.
    """
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def unwise_option_warnings(config: Any, *, rank: int | None, group_size: int | None, bits: int | None) -> list[str]:
    """Warnings for legal but unwise LoRA rank and group size on ``config``'s linears.

    Args:
        config: the model's :class:`~apiq_jax.models.config.ModelConfig`.
        rank: the LoRA rank (None: not checked).
        group_size: the quantization group size (None: not checked).
        bits: the weight bits (for the effective bits per weight of padded groups).

    Returns:
        One message per finding (empty when all is well).
    """
    shapes = linear_shapes(config)
    msgs = []
    if rank is not None:
        big = sorted(n for n, (i, o) in shapes.items() if rank >= min(i, o))
        if big:
            msgs.append(f"--rank {rank} >= min(in, out) of {', '.join(big)}: the LoRA factors of those layers hold "
                        "at least as many numbers as a full-rank update (and more than the quantized weights)")
    if group_size is not None and bits is not None:
        padded = {n: i for n, (i, _) in shapes.items() if i % group_size}
        if padded:
            worst = max(padded.values(), key=lambda i: -(-i // group_size) * group_size / i)
            eff = bits * (-(-worst // group_size) * group_size) / worst
            msgs.append(f"--group-size {group_size} does not divide the input width of {', '.join(sorted(padded))} "
                        f"({', '.join(sorted({str(i) for i in padded.values()}))}): every row is padded, "
                        f"{eff:.2f} code bits per weight instead of {bits} there (choose a divisor of the widths)")
    return msgs


def add_mesh_arguments(p: argparse.ArgumentParser, *, processes: bool = True) -> None:
    """Add ``--mesh`` and the multi-process flags (``--coordinator --num-processes --process-id``).

    Args:
        p: the command's parser.
        processes: also add the multi-process flags.

    Returns:
        None; the arguments are added to ``p``.
    """
    g = p.add_argument_group("devices and processes (docs/scaling.md)")
    g.add_argument("--mesh", default=None, metavar="data=D,fsdp=F",
                   help="device mesh: D-way data parallel x F-way fully sharded parameters (their product is the "
                        "number of devices; one may be left out). Default: every device on data (one device: "
                        "unsharded)")
    if not processes:
        return
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address (with --num-processes and --process-id; "
                        "APIQ_DISTRIBUTED=auto reads them from a TPU/SLURM environment instead)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="multi-process run: processes")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="multi-process run: this process")


def command_mesh(args: argparse.Namespace) -> Any:
    """Start multi-process JAX if asked to, and the mesh a command runs on.

    Args:
        args: parsed arguments of :func:`add_mesh_arguments`.

    Returns:
        A :class:`jax.sharding.Mesh`, or None for one device and no ``--mesh`` (the
        unsharded programs).

    Raises:
        ValueError: a bad ``--mesh`` or multi-process flags.
    """
    import jax

    from apiq_jax.sharding import initialize_distributed, make_mesh

    initialize_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))
    if args.mesh is None and jax.device_count() == 1:
        return None
    return make_mesh(args.mesh)
