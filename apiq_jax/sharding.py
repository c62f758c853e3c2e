"""Sharding over a JAX ``Mesh``: the mesh, the placement rules of every tree, multi-process start.

apiq-jax runs one SPMD program over a 2-D :class:`jax.sharding.Mesh` with the named axes
:data:`AXES`:

* ``"data"``: data parallelism; batches (and calibration samples) are split along it;
* ``"fsdp"``: fully sharded data parallelism (ZeRO-3): every parameter, LoRA factor and
  optimizer moment is split along it, and batches are split along it too (each FSDP
  device computes its own rows; the compiler gathers a layer's weights where they are used).

The rules (:func:`tree_shardings`), written once for every tree the library holds:

=========================================  ==============================================
leaf                                       split over ``"fsdp"`` along
=========================================  ==============================================
dense linear ``[out, in]`` (stacked         the output dimension (the input one when ``out``
``[L, out, in]``), embeddings, lm_head      is not a multiple of the axis); the vocabulary
                                            for embeddings and the head
:class:`~apiq_jax.quant.QuantizedTensor`   the output dimension of its codes, scales and
                                            zero points (the axis of size ``N``)
LoRA ``a [in, r]`` / ``b [r, out]``         ``in`` / ``out`` (as the base weight's rows)
optimizer state                             like its parameter (a LoRA-shaped moment is a
                                            :class:`~apiq_jax.lora.Lora`); counters replicated
norms, scalars, anything not divisible      replicated
batches ``[b, ...]``                        rows over ``("data", "fsdp")`` (``"data"`` alone
                                            when ``b`` is not a multiple of both)
=========================================  ==============================================

Nothing here communicates by hand: placement is :func:`jax.device_put` /
:func:`jax.make_array_from_callback`, and the compiler inserts the collectives.

Example:
  >>> import jax, jax.numpy as jnp
  >>> mesh = make_mesh("data=1,fsdp=1")
  >>> dict(mesh.shape)
  {'data': 1, 'fsdp': 1}
  >>> placed = place({"w": jnp.ones((4, 2))}, mesh)
  >>> placed["w"].sharding.spec == PartitionSpec("fsdp", None)
  True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from apiq_jax.lora import Lora
from apiq_jax.quant.tensor import QuantizedTensor

#: the mesh axes, in order
AXES = ("data", "fsdp")
#: the axes a batch's rows are split over (both: FSDP devices each compute their own rows)
BATCH_AXES = ("data", "fsdp")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}`` (axes left out are filled by :func:`make_mesh`).

    Args:
      spec: comma-separated ``axis=size`` pairs over :data:`AXES`.

    Returns:
      The sizes given.

    Raises:
      ValueError: an unknown axis, a repeated axis, or a size that is not a positive int.
    """
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"--mesh {spec!r}: {part.strip()!r} is not axis=size with an axis in {AXES}")
        if name in sizes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size <= 0:
            raise ValueError(f"--mesh {spec!r}: size of {name!r} must be a positive int, got {value.strip()!r}")
        sizes[name] = size
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp)`` mesh of ``devices`` (default: every device of every process).

    Args:
      spec: ``"data=4,fsdp=2"``, a dict of axis sizes, or None (every device on ``"data"``).
        One axis may be left out: it takes the devices the other leaves.
      devices: the devices (default ``jax.devices()``).

    Returns:
      A :class:`~jax.sharding.Mesh` with axes :data:`AXES`.

    Raises:
      ValueError: a bad spec, or sizes whose product is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in (spec or {}).items())
    sizes = parse_mesh_spec(text) if text else {}
    if len(sizes) < len(AXES):
        given = int(np.prod(list(sizes.values()) or [1]))
        missing = [a for a in AXES if a not in sizes]
        if n % given:
            raise ValueError(f"--mesh {text!r} does not divide the {n} available devices")
        for i, a in enumerate(missing):  # the first missing axis takes the rest, the others 1
            sizes[a] = n // given if i == 0 else 1
    shape = tuple(sizes[a] for a in AXES)
    if int(np.prod(shape)) != n:
        raise ValueError(
            f"--mesh {text!r} needs {int(np.prod(shape))} devices, but {n} are available "
            f"({jax.default_backend()}; jax.devices()); give sizes whose product is {n}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def _split(shape: tuple[int, ...], axes: Sequence[int], size: int) -> PartitionSpec:
    """Split the first of ``axes`` whose length is a multiple of ``size`` over "fsdp"."""
    spec: list[Any] = [None] * len(shape)
    if size > 1:
        for ax in axes:
            if 0 <= ax < len(shape) and shape[ax] % size == 0:
                spec[ax] = "fsdp"
                break
    elif shape and len(axes):
        spec[axes[0]] = "fsdp"  # a size-1 axis: same placement, and the spec says where it would go
    return PartitionSpec(*spec)


def _quantized_spec(qt: QuantizedTensor, fsdp: int) -> QuantizedTensor:
    n_out = qt.shape[-2]

    def rule(leaf: Any) -> PartitionSpec:
        shape = tuple(getattr(leaf, "shape", ()))
        # the output dimension: where the storage layout puts it (ndim - 2), else any axis of size N
        axes = [len(shape) - 2] if len(shape) >= 2 and shape[-2] == n_out else []
        axes += [i for i in reversed(range(len(shape))) if shape[i] == n_out and i not in axes]
        return _split(shape, axes, fsdp) if axes else PartitionSpec()

    return jax.tree.map(rule, qt)


def _lora_spec(lora: Lora, fsdp: int) -> Lora:
    def rule(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        shape = tuple(leaf.shape)
        name = getattr(path[-1], "key", None) if path else None
        if len(shape) < 2:
            return PartitionSpec()
        # a [.., in, r]: split "in"; b [.., r, out]: split "out"
        return _split(shape, [len(shape) - 2] if name == "a" else [len(shape) - 1], fsdp)

    return jax.tree_util.tree_map_with_path(rule, lora)


def tree_specs(tree: Any, fsdp: int) -> Any:
    """The :class:`~jax.sharding.PartitionSpec` of every leaf of ``tree`` (the rules above).

    Args:
      tree: a frozen/dense params tree, a :class:`~apiq_jax.lora.Lora`, an optax state
        holding LoRA-shaped moments, or any tuple/dict of these (arrays or
        :class:`jax.ShapeDtypeStruct` leaves).
      fsdp: the size of the ``"fsdp"`` axis (a leaf is split only along a dimension that
        is a multiple of it).

    Returns:
      A tree of the same structure with a PartitionSpec per array leaf.
    """

    def is_node(x: Any) -> bool:
        return isinstance(x, (QuantizedTensor, Lora))

    def rule(path: tuple[Any, ...], leaf: Any) -> Any:
        if isinstance(leaf, QuantizedTensor):
            return _quantized_spec(leaf, fsdp)
        if isinstance(leaf, Lora):
            return _lora_spec(leaf, fsdp)
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) - _stacked_axes(path) < 2:  # norms, scalars (per layer): replicated
            return PartitionSpec(*([None] * len(shape)))
        return _split(shape, [len(shape) - 2, len(shape) - 1], fsdp)

    return jax.tree_util.tree_map_with_path(rule, tree, is_leaf=is_node)


def _stacked_axes(path: tuple[Any, ...]) -> int:
    """1 when ``path`` is under stacked ``"layers"`` (a dict of ``[L, ...]`` leaves, not a list), else 0."""
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    for i, k in enumerate(keys[:-1]):
        if k == "layers" and isinstance(keys[i + 1], str):
            return 1
    return 0


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """:func:`tree_specs` as :class:`~jax.sharding.NamedSharding` on ``mesh``.

    Args:
      tree: as for :func:`tree_specs`.
      mesh: a mesh with axes :data:`AXES`.

    Returns:
      A tree of the same structure with a NamedSharding per array leaf.
    """
    specs = tree_specs(tree, mesh.shape["fsdp"])
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def place(tree: Any, mesh: Mesh) -> Any:
    """``tree`` on ``mesh`` by the rules of :func:`tree_specs` (host arrays are copied to their shards).

    Every process must hold the same values (as when each loads the same checkpoint).

    Args:
      tree: as for :func:`tree_specs`.
      mesh: a mesh with axes :data:`AXES`.

    Returns:
      The tree with every array leaf a global :class:`jax.Array` sharded on ``mesh``.
    """
    shardings = tree_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if _is_host(x) else x, s), tree, shardings)


def _is_host(x: Any) -> bool:
    """Not a jax.Array, or (several processes) one of this process only: placed from a host copy."""
    if not isinstance(x, jax.Array):
        return True
    return jax.process_count() > 1 and x.is_fully_addressable


def batch_spec(mesh: Mesh, rows: int) -> PartitionSpec:
    """How a batch of ``rows`` rows is split: over ``("data", "fsdp")``, else ``"data"``.

    Args:
      mesh: a mesh with axes :data:`AXES`.
      rows: the batch size.

    Returns:
      The PartitionSpec of the leading (row) dimension.

    Raises:
      ValueError: ``rows`` is not a multiple of the ``"data"`` axis.
    """
    d, f = mesh.shape["data"], mesh.shape["fsdp"]
    if rows % (d * f) == 0:
        return PartitionSpec(BATCH_AXES)
    if rows % d == 0:
        return PartitionSpec("data")
    raise ValueError(f"batch size {rows} must be a multiple of the mesh's data axis ({d}); mesh {dict(mesh.shape)}")


def place_batch(rows: Any, mesh: Mesh) -> jax.Array:
    """A batch ``[b, ...]`` as a global array split by :func:`batch_spec`.

    Each process reads only the rows of its own devices (``rows`` may be a ``np.memmap``
    or any array indexable by slices, holding the global batch).

    Args:
      rows: the global batch (host array).
      mesh: a mesh with axes :data:`AXES`.

    Returns:
      The global :class:`jax.Array`.
    """
    sharding = NamedSharding(mesh, batch_spec(mesh, rows.shape[0]))
    return jax.make_array_from_callback(tuple(rows.shape), sharding, lambda idx: np.asarray(rows[idx]))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (scalars, losses).

    Args:
      mesh: the mesh.

    Returns:
      ``NamedSharding(mesh, PartitionSpec())``.
    """
    return NamedSharding(mesh, PartitionSpec())


def gather_layer(tree: Any) -> Any:
    """One layer's parameters gathered over ``"fsdp"`` where they are used (inside a jitted step).

    Under :func:`jax.set_mesh` with an ``"fsdp"`` axis above 1 (as
    :func:`apiq_jax.training.make_train_step` runs a sharded step) every array of ``tree`` is
    constrained to be replicated: the compiler all-gathers the layer's shards right before
    the layer (inside the layer scan, one layer at a time) instead of resharding the
    activations. Elsewhere (no mesh, or no FSDP) it returns ``tree`` unchanged.

    Args:
      tree: a layer's params and LoRA (any pytree).

    Returns:
      ``tree``, constrained.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), tree)


def placement_mesh() -> Mesh | None:
    """The mesh set by :func:`jax.set_mesh` when arrays must be placed on it explicitly, else None.

    That is when its ``"fsdp"`` axis is above 1 (calibration splits a block's weights and
    training state over it) or when it spans several processes (every array a program
    reads must then be a global array).

    Returns:
      The concrete mesh, or None.
    """
    mesh = jax.sharding.get_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names:
        return None
    if mesh.shape["fsdp"] == 1 and jax.process_count() == 1:
        return None
    return mesh


def is_primary() -> bool:
    """Whether this is process 0 (the one that writes files in a multi-process run).

    Returns:
      True in a single-process run.
    """
    return jax.process_index() == 0


def on_primary(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on process 0 only; every process raises when it raised there.

    Process 0 checks and writes what one process must (an output directory, a work
    directory's files); the others wait for its verdict (one broadcast), so an error there
    stops every process instead of leaving the others waiting. Single-process: ``fn()``.

    Args:
      fn: the work of process 0.
      what: the work, for the others' message ("claim --out").

    Returns:
      ``fn()``'s result on process 0, None on the others.

    Raises:
      Exception: on process 0, what ``fn`` raised; on the others, ValueError saying process
        0 could not do ``what``.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
            error = e
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process 0 could not {what} (its message says why); this process stops too")
    return result


def to_host(tree: Any) -> Any:
    """Every array leaf of ``tree`` as one numpy array on this host (gathered across processes).

    Args:
      tree: a tree of (possibly sharded, possibly multi-process) arrays.

    Returns:
      The same tree with numpy leaves.
    """
    from jax.experimental import multihost_utils

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start multi-process JAX (``jax.distributed.initialize``) when asked to.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordinator, or None.
      num_processes: the number of processes, or None.
      process_id: this process's index, or None.

    Returns:
      True when JAX was started as one of several processes: all three arguments given, or
      none given and ``$APIQ_DISTRIBUTED=auto`` (JAX then reads the cluster from the
      environment, e.g. on a TPU slice or under SLURM); False otherwise.

    Raises:
      ValueError: some but not all of the three arguments given, or ids out of range.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        if os.environ.get("APIQ_DISTRIBUTED") == "auto":
            jax.distributed.initialize()
            return True
        return False
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id must be given together")
    if num_processes <= 0 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator {coordinator!r} must be HOST:PORT")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
