"""The ``--out`` directory of a command that writes one (quantize, finetune, export, import): checked, locked, marked.

What a user must never meet is lost or half-written work. So, before anything is written:

- ``--out`` equal to, inside, or holding ``--model`` is refused;
- a finished output, the output of another command, an interrupted run with other
  arguments (the differing flags are named) and a non-empty directory that is not an
  apiq-jax output are refused unless ``--overwrite`` is given;
- files staged by a run killed while saving are removed when the next run claims ``--out``;
- a second process on the same ``--out`` fails at once: ``OUT/.apiq-jax.lock`` is held with
  ``fcntl.flock``, which the kernel releases when its process dies, so a crashed run leaves
  nothing stuck.

While the command runs, ``OUT/.apiq-jax-run.json`` says ``"state": "running"`` with the
command and its arguments; it is rewritten with ``"state": "complete"`` as the very last
write. A run killed at any moment therefore never leaves something that looks finished,
and ``apiq-jax eval``/``finetune`` on it say that it is unfinished (:func:`check_finished`).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

#: the run marker inside --out (command, arguments, state), written first and completed last
RUN_FILE = ".apiq-jax-run.json"
#: the lock file inside --out (flock-ed while a command writes there)
LOCK_FILE = ".apiq-jax.lock"
#: argparse destinations that do not change what is written, so a resumed run may change them
NEUTRAL_ARGS = frozenset({"command", "func", "out", "overwrite", "quiet", "backend", "max_shard_size", "eval",
                          "mesh", "coordinator", "num_processes", "process_id", "resume_hint",
                          "offload_activations"})
#: arguments naming files: compared by their resolved path
PATH_ARGS = frozenset({"model", "calib", "data"})
#: a file staged by apiq_jax.models.safetensors_io.StagedFiles (".NAME.<12 hex>.tmp") or our marker's
_STAGED = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$|^" + re.escape(RUN_FILE) + r"\.tmp$")
RUNNING = "running"
COMPLETE = "complete"


def flag(dest: str) -> str:
    """The command-line flag of an argparse destination (``group_size`` -> ``--group-size``).

    Args:
        dest: the destination name.

    Returns:
        The flag.
    """
    return "--" + dest.replace("_", "-")


def run_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of ``args`` that determine what the command writes, JSON-able.

    Args:
        args: parsed arguments.

    Returns:
        ``{dest: value}`` without :data:`NEUTRAL_ARGS`; paths of :data:`PATH_ARGS` resolved.
    """
    out: dict[str, Any] = {}
    for k, v in sorted(vars(args).items()):
        if k in NEUTRAL_ARGS or k.startswith("_") or callable(v):
            continue
        if k in PATH_ARGS and v is not None:
            v = str(Path(v).resolve())
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return out


def read_marker(out: Path) -> dict[str, Any] | None:
    """The run marker of ``out``, or None when there is none (or it is unreadable).

    Args:
        out: an output directory.

    Returns:
        The marker dict, or None.
    """
    try:
        marker = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_finished(model_dir: Path, flag_name: str = "--model") -> None:
    """Refuse an output directory whose command has not finished (interrupted or running).

    Args:
        model_dir: a model directory given to a command.
        flag_name: the flag naming it in the message.

    Returns:
        None.

    Raises:
        ValueError: ``model_dir`` holds a run marker that is not complete.
    """
    marker = read_marker(model_dir)
    if marker is not None and marker.get("state") != COMPLETE:
        cmd = marker.get("command", "?")
        raise ValueError(
            f"{flag_name} {model_dir} is the unfinished output of `apiq-jax {cmd}` (interrupted, or still "
            f"running); re-run that command to finish it"
        )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [f"{flag(k)} {new.get(k)} (the run in --out used {old.get(k)})" for k in keys]


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(out: Path, model_dir: Path, name: str = "--model") -> None:
    """Refuse an ``--out`` that is, lies inside, or holds an input directory (nothing is read or written).

    Args:
        out: the --out directory.
        model_dir: the input directory (``--model``, or import's SRC / ``--adapter``).
        name: how the message names the input directory.

    Returns:
        None.

    Raises:
        ValueError: the two overlap, or ``out`` exists and is not a directory.
    """
    check_overlap(out, model_dir, name)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    parent = next((p for p in [out.resolve(), *out.resolve().parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def check_overlap(out: Path, src: Path, name: str = "--model") -> None:
    """Refuse an ``--out`` that is, lies inside, or holds the input directory ``src``.

    Args:
        out: the --out directory.
        src: an input directory of the command.
        name: how the message names ``src`` (``--model``, ``SRC``, ``--adapter``).

    Returns:
        None.

    Raises:
        ValueError: the two overlap.
    """
    o, m = out.resolve(), src.resolve()
    kept = "the model" if name == "--model" else name
    if o == m:
        raise ValueError(f"--out {out} is the {name} directory; give a new directory ({kept} is kept)")
    if _is_within(o, m):
        raise ValueError(f"--out {out} is inside the {name} directory {src}; give a directory outside it")
    if _is_within(m, o):
        raise ValueError(f"--out {out} holds the {name} directory {src}; give a directory that does not")


class OutputDir:
    """The claimed ``--out`` of one command run (a context manager).

    On entering: the checks of the module docstring, the lock, and the running marker.
    :meth:`finish` writes the complete marker (the last write of a run). On leaving with a
    user error when the directory did not exist before, it is removed again (nothing is left
    behind) unless :meth:`start_work` was called; after an interruption it is kept, to be resumed.

    Args:
        out: the --out directory.
        command: the command's name.
        args: its parsed arguments (those of :func:`run_arguments` are recorded).
        overwrite: the --overwrite flag.
        work_subdirs: the command's resumable state inside ``out`` (discarded on --overwrite).
        rerun_finished: a finished output with the same arguments may be re-run (finetune:
            its final checkpoint makes the re-run write the same files again).
    """

    def __init__(self, out: Path, command: str, args: argparse.Namespace, *, overwrite: bool,
                 work_subdirs: tuple[str, ...] = (), rerun_finished: bool = False) -> None:
        self.out = Path(out)
        self.command = command
        self.arguments = run_arguments(args)
        self.overwrite = overwrite
        self.work_subdirs = work_subdirs
        self.rerun_finished = rerun_finished
        self.created = False
        self.resumed = False
        self.working = False
        self._previous_marker: bytes | None = None
        self._fd: int | None = None

    # --- the checks -----------------------------------------------------------------------------
    def check(self) -> None:
        """Decide whether ``out`` may be written (read-only; raises when it may not).

        Returns:
            None; sets :attr:`resumed` when an interrupted run of the same arguments is found.

        Raises:
            ValueError: see the module docstring.
        """
        out = self.out
        self.resumed = False
        entries = [p.name for p in out.iterdir()] if out.is_dir() else []
        entries = [n for n in entries if n not in (LOCK_FILE, RUN_FILE + ".tmp")]  # ours, from a killed start
        if not entries:
            return
        marker = read_marker(out)
        again = "pass --overwrite to replace it, or choose another --out"
        if marker is None:
            if (out / "apiq_meta.json").is_file():
                if self.overwrite:
                    return
                raise ValueError(f"--out {out} already holds a finished model; {again}")
            if self.overwrite:
                return
            raise ValueError(
                f"--out {out} is a non-empty directory that is not an apiq-jax output ({len(entries)} entries, "
                f"e.g. {sorted(entries)[0]}); give a new or empty directory, or pass --overwrite to write into it"
            )
        if marker.get("command") != self.command:
            if self.overwrite:
                return
            raise ValueError(f"--out {out} holds the output of `apiq-jax {marker.get('command')}`; {again}")
        diff = _differences(marker.get("args") or {}, self.arguments)
        if marker.get("state") == COMPLETE:
            if self.overwrite or (self.rerun_finished and not diff):
                self.resumed = not self.overwrite
                return
            differs = f" (made with other arguments: {'; '.join(diff)})" if diff else ""
            raise ValueError(
                f"--out {out} already holds a finished model of `apiq-jax {self.command}`{differs}; {again}"
            )
        if self.overwrite:
            return
        if diff:
            raise ValueError(
                f"--out {out} holds an interrupted run with other arguments: {'; '.join(diff)}; re-run with the "
                "same arguments to resume it, or pass --overwrite to start over"
            )
        self.resumed = True

    # --- the lock ---------------------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.out / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    holder = path.read_text().strip() or "?"
                except OSError:
                    holder = "?"
                raise ValueError(
                    f"--out {self.out} is in use by another apiq-jax process (pid {holder}, lock {path}); wait for "
                    "it to finish or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder removed meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    # --- the marker -------------------------------------------------------------------------------
    def _write_marker(self, state: str) -> None:
        path = self.out / RUN_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"command": self.command, "state": state, "args": self.arguments}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def start_work(self) -> None:
        """Say that the long work begins: from now on a failed run keeps the directory (to resume).

        Returns:
            None.
        """
        self.working = True

    def finish(self) -> None:
        """Mark the output complete (call it after the last file of the run is written).

        Returns:
            None.
        """
        self._write_marker(COMPLETE)

    def _holds_nothing(self) -> bool:
        """True when ``out`` holds no file but the marker and the lock (empty folders aside)."""
        return all(p.name in (RUN_FILE, LOCK_FILE) or p.is_dir() for p in self.out.rglob("*"))

    def __enter__(self) -> "OutputDir":
        self.check()  # fail before creating anything
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock()
            self.check()  # again, now that no other process can change it
            for stale in self.out.iterdir():  # files staged by a run killed while saving (we hold the lock)
                if _STAGED.match(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)
            if self.overwrite:
                for sub in self.work_subdirs:
                    shutil.rmtree(self.out / sub, ignore_errors=True)
            marker = self.out / RUN_FILE
            self._previous_marker = marker.read_bytes() if marker.is_file() else None
            self._write_marker(RUNNING)
        except BaseException:
            self._unlock()
            if self.created:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            user_error = exc_type is not None and issubclass(exc_type, (ValueError, FileNotFoundError))
            if user_error and self.created and (not self.working or self._holds_nothing()):
                shutil.rmtree(self.out, ignore_errors=True)  # a user error before any work: leave nothing
            elif user_error and not self.working:  # leave the directory's marker as it was found
                if self._previous_marker is None:
                    (self.out / RUN_FILE).unlink(missing_ok=True)
                else:
                    (self.out / RUN_FILE).write_bytes(self._previous_marker)
        finally:
            self._unlock()


class SecondaryOutput:
    """What a process other than process 0 of a multi-process run holds of ``--out``: nothing.

    Process 0 alone checks, locks and marks ``--out`` (:class:`OutputDir`) and writes the
    result; the others only write their shards of the training checkpoints (orbax
    coordinates them). Same interface as :class:`OutputDir`, every method a no-op.
    """

    resumed = False

    def check(self) -> None:
        """Nothing to check (process 0 does).

        Returns:
            None.
        """

    def start_work(self) -> None:
        """Nothing to mark (process 0 does).

        Returns:
            None.
        """

    def finish(self) -> None:
        """Nothing to mark (process 0 does).

        Returns:
            None.
        """

    def __enter__(self) -> "SecondaryOutput":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
