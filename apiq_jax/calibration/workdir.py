"""The resumable work directory of a calibration run (:class:`WorkDir`).

Layout::

    fingerprint.json      what the run is (method, configs, options, digests of params and ids)
    finished/<i>.safetensors   block i's state (ApiQ: clip logits + LoRA), every block kept,
                          written atomically; read back whole (resume) or one tensor at a time
                          (a result that is not held in memory)
    streams/<i>/          the activations after block i (an orbax checkpoint through
                          :class:`apiq_jax.checkpoint.Checkpointer`); only the newest is kept,
                          and its presence marks block i (and all before it) as finished
    block_reports.json    the finished blocks' reports

A run killed at any point resumes after the last block whose streams were written, with a
result bit-identical to an uninterrupted run; a state written without its streams (killed
in between) is discarded and the block redone. Of a multi-process run (one shared file
system), process 0 alone writes the files; every process writes its shards of ``streams/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import apiq_jax.sharding as sharding
from apiq_jax.calibration.reports import BlockReport
from apiq_jax.checkpoint import Checkpointer, restore_failure
from apiq_jax.models.hf_io import LazyTensor, materialize
from apiq_jax.models.safetensors_io import read_header, write_safetensors

__all__ = ["WorkDir", "digest", "run_fingerprint"]


class WorkDir:
    """Per-block checkpoints of one calibration run.

    Args:
      path: the directory (created).
      fingerprint: JSON-able description of the run (:func:`run_fingerprint`).

    Raises:
      ValueError: ``path`` holds a different run (the message names what differs).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path).resolve()
        self.finished_dir = self.path / "finished"
        self.reports_file = self.path / "block_reports.json"
        # of several processes (one shared file system), process 0 alone writes the files here;
        # all of them write their shards of the streams' orbax checkpoints
        sharding.on_primary(lambda: self._create(fingerprint), f"use the work directory {self.path}")
        self.streams = Checkpointer(self.path / "streams", max_to_keep=1)
        first = self.next_block()  # every process (orbax agrees on the steps across processes)
        if sharding.is_primary():
            for stale in self.finished_dir.glob("*.safetensors"):
                if stale.stem.isdigit() and int(stale.stem) >= first:
                    stale.unlink()  # a state saved by a run killed before its streams were

    def _create(self, fingerprint: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint(fingerprint)
        self.finished_dir.mkdir(exist_ok=True)

    def _check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        fp_file = self.path / "fingerprint.json"
        if not fp_file.exists():
            _atomic_write(fp_file, json.dumps(fingerprint, indent=2))
            return
        try:
            old = json.loads(fp_file.read_text())
        except ValueError as e:
            raise ValueError(f"{fp_file} is corrupt ({e}); delete {self.path} to discard it and start over") from e
        if old != fingerprint:
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ValueError(
                f"the work directory {self.path} holds a different calibration run (differs in: {', '.join(diff)}); "
                f"re-run with the arguments it was started with, or delete {self.path} to start over"
            )

    def next_block(self) -> int:
        """Index of the first block that has not finished.

        Returns:
          0 when nothing was saved.
        """
        last = self.streams.latest_step()
        return 0 if last is None else last + 1

    def reports(self) -> dict[int, BlockReport]:
        """The saved block reports.

        Returns:
          ``{block index: BlockReport}``.
        """
        if not self.reports_file.exists():
            return {}
        return {int(k): BlockReport.from_dict(v) for k, v in json.loads(self.reports_file.read_text()).items()}

    def save(self, i: int, state: Any, streams: Any, report: BlockReport) -> None:
        """Persist finished block ``i``: its state, then its report, then the streams that mark it done.

        Args:
          i: the block index.
          state: the block's state pytree.
          streams: the activations after block i.
          report: the block's report.

        Returns:
          None.
        """
        leaves = jax.tree_util.tree_flatten_with_path(sharding.to_host(state))[0]  # split over processes: gathered

        def write() -> None:
            write_safetensors(self._finished_file(i), {jax.tree_util.keystr(k): v for k, v in leaves})  # atomic
            reports = {k: v.to_dict() for k, v in self.reports().items() if k < i}
            reports[i] = report.to_dict()
            _atomic_write(self.reports_file, json.dumps({str(k): v for k, v in sorted(reports.items())}, indent=1))

        sharding.on_primary(write, f"save block {i} in {self.path}")
        self.streams.save(i, streams)

    def restore_state(self, i: int, template: Any) -> Any:
        """Block ``i``'s state, in the structure and dtypes of ``template``.

        Args:
          i: a finished block.
          template: a pytree like the saved state.

        Returns:
          The restored state (device arrays).

        Raises:
          ValueError: the state file is missing or damaged (the message says how to discard the
            work directory).
        """
        lazy = self.lazy_state(i, template)
        try:
            return materialize(lazy)
        except ValueError as e:
            raise self._damaged(i, e) from e

    def _damaged(self, i: int, why: Any) -> ValueError:
        return ValueError(f"block {i}'s state {self._finished_file(i)} of the work directory is missing or corrupt "
                          f"({why}); delete {self.path} to discard it (or pass --overwrite) and start over")

    def _finished_file(self, i: int) -> Path:
        return self.finished_dir / f"{i}.safetensors"

    def lazy_state(self, i: int, template: Any) -> Any:
        """Block ``i``'s state as :class:`~apiq_jax.models.hf_io.LazyTensor` leaves (nothing read yet).

        Args:
          i: a finished block.
          template: a pytree like the saved state; its leaves' dtypes are the dtypes the
            lazy tensors are read in.

        Returns:
          The state, each leaf read from ``finished/<i>.safetensors`` when converted to an array.

        Raises:
          ValueError: the file is missing or does not hold the template's tensors.
        """
        file = self._finished_file(i)
        try:
            header = read_header(file)[0]
        except (OSError, ValueError) as e:
            raise self._damaged(i, e) from e
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        lazy = []
        for path, leaf in leaves:
            key = jax.tree_util.keystr(path)
            if key not in header or tuple(header[key].shape) != tuple(leaf.shape):
                raise self._damaged(i, f"it does not hold {key} {tuple(leaf.shape)}")
            lazy.append(LazyTensor(file, key, leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, lazy)

    def restore_streams(self, i: int, template: Any) -> Any:
        """The streams saved after block ``i`` (the newest finished one).

        Args:
          i: the last finished block.
          template: a pytree like the saved streams.

        Returns:
          The restored streams.
        """
        return self._restore(self.streams, i, template)

    def _restore(self, ckpt: Checkpointer, i: int, template: Any) -> Any:
        """Restore step ``i`` of ``ckpt``; a corrupt checkpoint becomes one error saying how to discard it."""
        try:
            return ckpt.restore(i, template)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged file
            raise ValueError(
                f"the checkpoint {ckpt.directory / str(i)} of the work directory is corrupt "
                f"({restore_failure(e)}); delete {self.path} to discard it (or pass --overwrite) and start over"
            ) from e

    def close(self) -> None:
        """Close the streams' checkpointer.

        Returns:
          None.
        """
        self.streams.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def digest(tree: Any) -> str:
    """Cheap content hash of a pytree (shapes, dtypes and a strided sample of every leaf).

    A lazily read tensor (:class:`~apiq_jax.models.hf_io.LazyTensor`) is identified by its
    file (path, size, modification time) and key instead, so it is not read.

    Args:
      tree: any pytree of arrays.

    Returns:
      A hex SHA-256 digest.
    """
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
        if isinstance(leaf, LazyTensor):  # a tensor on disk: its file's identity, not its bytes (not read)
            stat = leaf.path.stat()
            h.update(f"{leaf.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{leaf.key}{leaf.shape}{leaf.dtype}".encode())
            continue
        arr = jnp.asarray(leaf)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        flat = arr.reshape(-1)
        step = max(1, flat.size // 65536)
        h.update(np.asarray(flat[::step]).tobytes())
    return h.hexdigest()


def run_fingerprint(
    method: str, model_config: Any, quant_config: Any, lora_config: Any, options: Any, ids: np.ndarray,
    params: Any, lora0_digest: str,
) -> dict[str, Any]:
    """What identifies a calibration run: equal fingerprints mean a work dir can be resumed.

    Args:
      method: registry name.
      model_config, quant_config: dataclass configs.
      lora_config: the :class:`~apiq_jax.lora.LoraConfig`.
      options: the method's options (a dataclass with ``to_dict``).
      ids: the calibration ids.
      params: the dense params (embeddings and layers are digested).
      lora0_digest: what identifies the initial LoRA (a :func:`digest` of it, or of what makes it).

    Returns:
      A JSON-able dict.
    """
    return {
        "method": method,
        "model_config": json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str),
        "quant_config": dataclasses.asdict(quant_config),
        "lora_config": lora_config.to_dict(),
        "options": options.to_dict(),
        "calib_ids": hashlib.sha256(ids.tobytes() + str(ids.shape).encode()).hexdigest(),
        "params": digest({"embed": params["embed_tokens"], "layers": params["layers"]}),
        "lora_init": lora0_digest,
    }
