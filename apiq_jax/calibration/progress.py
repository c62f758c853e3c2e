"""tqdm progress bars of the calibration loops, fed from inside compiled programs.

A :class:`Progress` shows one bar over the blocks and, below it, one over the epochs of the
current block (or stage). The training programs report every finished epoch through
``jax.debug.callback`` with the bar's :meth:`Progress.token`, a traced int32 argument of the
program: the compiled program is the same for every call (one compilation), while each
call's epochs reach the bar of that call, even when calibrations run in turn or nest.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

__all__ = ["Progress", "report_epoch"]


class Progress:
    """Bars of one calibration run: blocks (outer) and the epochs of the current block (inner).

    Args:
      enabled: show bars; when False every method is a no-op and :meth:`token` is None.
      total: number of blocks.
      desc: label of the outer bar (the method name).
      done: blocks already finished (a resumed run).
    """

    _open: ClassVar[weakref.WeakValueDictionary[int, Progress]] = weakref.WeakValueDictionary()
    _ids: ClassVar[Any] = itertools.count(1)

    def __init__(self, enabled: bool, total: int, desc: str, *, done: int = 0) -> None:
        self.outer: Any = None
        self.inner: Any = None
        self._id: int | None = None
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.outer = tqdm(total=total, desc=desc, unit="block", position=0)
            if done:
                self.outer.update(done)
            self._id = next(Progress._ids)
            Progress._open[self._id] = self

    def token(self) -> jnp.ndarray | None:
        """The int32 scalar a compiled program passes to :func:`report_epoch`.

        Returns:
          The token, or None when the bars are disabled (the program then reports nothing).
        """
        return None if self._id is None else jnp.asarray(self._id, jnp.int32)

    def start_inner(self, desc: str, total: int) -> None:
        """Open the epoch bar of the next block (closing the previous one).

        Args:
          desc: its label ("block 3").
          total: epochs it will count.

        Returns:
          None.
        """
        if self.outer is not None:
            self.close_inner()
            self.inner = self._tqdm(total=total, desc=desc, unit="epoch", position=1, leave=False)

    def epoch_done(self, epoch: Any, loss: Any) -> None:
        """Advance the epoch bar and show the epoch's mean loss.

        Args:
          epoch: the finished epoch (0-based).
          loss: its mean loss.

        Returns:
          None.
        """
        if self.inner is not None:
            self.inner.update(1)
            self.inner.set_postfix(epoch=int(epoch) + 1, loss=f"{float(loss):.3e}")

    def close_inner(self) -> None:
        """Close the epoch bar, if open.

        Returns:
          None.
        """
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def block_done(self, **postfix: Any) -> None:
        """Advance the block bar by one, with an optional postfix (e.g. the block's error).

        Args:
          **postfix: shown beside the bar.

        Returns:
          None.
        """
        self.close_inner()
        if self.outer is not None:
            self.outer.update(1)
            if postfix:
                self.outer.set_postfix(**postfix)

    def close(self) -> None:
        """Close both bars; later reports with this bar's token are dropped.

        Returns:
          None.
        """
        self.close_inner()
        if self.outer is not None:
            self.outer.close()
        if self._id is not None:
            Progress._open.pop(self._id, None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _on_epoch(token: Any, epoch: Any, loss: Any) -> None:
    bar = Progress._open.get(int(token))
    if bar is not None:
        bar.epoch_done(epoch, loss)


def report_epoch(token: jnp.ndarray | None, epoch: jnp.ndarray, loss: jnp.ndarray) -> None:
    """Tell the bar behind ``token`` that ``epoch`` finished (traced; call inside jit).

    Args:
      token: :meth:`Progress.token` passed into the program, or None (nothing is reported).
      epoch: the epoch index (traced).
      loss: the epoch's mean loss (traced).

    Returns:
      None.
    """
    if token is not None:
        jax.debug.callback(_on_epoch, token, epoch, loss)
