"""Orbax checkpoints for training state (LoRA, optimizer state, step counters).

A thin layer over ``orbax.checkpoint.CheckpointManager`` so every long job in the
library saves and resumes the same way: save a pytree at a step, find the latest
step, restore into the structure of a template pytree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores pytrees by step under ``directory`` (keeps the last ``max_to_keep``).

    Args:
      directory: the checkpoint directory (created if needed).
      max_to_keep: how many of the newest steps to keep on disk.

    Raises:
      ValueError: ``max_to_keep`` is below 1.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r} must be >= 1")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None when nothing was saved yet.

        Returns:
          The step number, or None.
        """
        return self._manager.latest_step()

    def save(self, step: int, tree: Any) -> None:
        """Save ``tree`` at ``step`` and wait until it is on disk (a crash right after keeps it).

        Args:
          step: the step number to save under.
          tree: the pytree to save (arrays and Python scalars).

        Returns:
          None.
        """
        self._manager.save(step, args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> Any:
        """Restore the pytree saved at ``step`` into the structure/dtypes of ``template``.

        Args:
          step: a saved step (e.g. :meth:`latest_step`).
          template: a pytree with the structure, shapes and dtypes to restore into (its
            values are not read).

        Returns:
          The restored pytree, structured like ``template``.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Close the underlying checkpoint manager (done on leaving a ``with`` block too).

        Returns:
          None.
        """
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def restore_failure(error: BaseException) -> str:
    """A one-line summary of why orbax could not restore a checkpoint (for a user-facing error).

    Orbax and tensorstore raise many exception types with long multi-line messages for a
    damaged or mismatched checkpoint; this keeps the type and the first line (at most 300
    characters, without tensorstore's "See full ..." tail).

    Args:
      error: the exception raised by :meth:`Checkpointer.restore`.

    Returns:
      ``"TypeName: first line"``.
    """
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" See full ")[0][:300]
    return f"{type(error).__name__}: {first}"
