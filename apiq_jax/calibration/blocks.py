"""One decoder block at a time: embeddings, running a block over the calibration set, freezing.

* :func:`embed_ids` / :func:`run_block`: the start of every activation stream and one block
  applied to all samples (a few short samples per iteration, :func:`samples_per_pass`; one
  compiled program for same-shaped blocks). Under
  :func:`jax.set_mesh` the streams are split over the devices by samples
  (:func:`apiq_jax.sharding.batch_spec`) and every device runs its own samples' loop; the
  results are the same as on one device.
* :func:`freeze_layer`: the one route from a layer's dense linears to QuantizedTensor leaves
  (:func:`apiq_jax.quant.quantize`, with learned :class:`~apiq_jax.quant.ClipLogits` where
  given). Every method quantizes each linear exactly once through it (GPTQ, which picks its
  own codes, through :func:`apiq_jax.quant.from_codes`).
* :func:`fake_quant_layer`: the differentiable counterpart used while training.
* :func:`float32_view`: a frozen layer as the float32 computations see it (no re-quantizing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import apiq_jax.sharding as sharding
from apiq_jax.lora import LINEARS, Lora
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import block_forward, embed
from apiq_jax.models.quantized import quantize_weight
from apiq_jax.quant import ClipLogits, FakeQuantWeight, QuantConfig, QuantizedTensor, fake_quantize

__all__ = ["HOST_CHUNK_BYTES", "KEEP_QUANTIZED_MAX_ELEMENTS", "PASS_TOKENS", "as_float32", "block_error", "embed_ids",
           "embed_ids_host", "fake_quant_layer", "float32_view", "freeze_layer", "host_chunks", "layer_idx_arg",
           "run_block", "sample_groups", "samples_per_pass", "split_samples", "stream_error", "with_quantized"]

#: blocks whose fake-quantized linears hold at most this many weights keep each ``Q(W)`` and its
#: scale-gradient terms from the forward pass (2 x 4 bytes per weight: 32 MiB at the limit)
#: instead of recomputing them in the backward pass (:func:`fake_quant_layer`)
KEEP_QUANTIZED_MAX_ELEMENTS = 2**22
#: tokens per loop iteration of the gradient-free block passes (:func:`samples_per_pass`)
PASS_TOKENS = 1024


@partial(jax.jit, static_argnames=("config",))
def _embed_jit(params: Mapping[str, Any], ids: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    return embed(params, ids, config)


def _embed_table(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"embed_tokens": table}`` on the device (a lazily read table is read now)."""
    table = params["embed_tokens"]
    return {"embed_tokens": table if isinstance(table, QuantizedTensor) else jnp.asarray(table)}


def embed_ids(params: Mapping[str, Any], ids: Any, config: ModelConfig) -> jnp.ndarray:
    """Embeddings of the calibration ids (the start of every stream).

    Args:
      params: model params (only ``embed_tokens`` is read).
      ids: int ids ``[n, seqlen]``.
      config: the model config.

    Returns:
      ``[n, seqlen, D]`` in the embedding's dtype.
    """
    table = _embed_table(params)
    split = samples_sharding(len(ids))
    if jax.process_count() > 1 and (mesh := sharding.placement_mesh()) is not None:
        # several processes: a global array of which each process embeds only its own devices' samples
        ids = np.asarray(ids, np.int32)
        return jax.make_array_from_callback(
            (*ids.shape, config.hidden_size), split or NamedSharding(mesh, PartitionSpec()),
            lambda idx: np.asarray(_embed_jit(table, jnp.asarray(ids[idx[:2]]), config))[..., idx[2]])
    x0 = _embed_jit(table, jnp.asarray(ids, jnp.int32), config)
    return x0 if split is None else jax.device_put(x0, split)


def samples_sharding(n: int) -> NamedSharding | None:
    """How ``n`` calibration samples are split over the mesh set by :func:`jax.set_mesh`, if any.

    Args:
      n: the number of samples.

    Returns:
      A NamedSharding of the sample axis over ``("data", "fsdp")`` (or ``"data"``), or None
      without a mesh of more than one device, or when ``n`` is not a multiple of its
      ``"data"`` axis (the streams then stay on one device).
    """
    mesh = jax.sharding.get_mesh()
    if mesh.empty or mesh.size == 1 or "data" not in mesh.axis_names:
        return None
    try:
        return NamedSharding(mesh, sharding.batch_spec(mesh, n))
    except ValueError:
        return None


def sample_groups(xs: Any) -> tuple[int, NamedSharding | None]:
    """How the samples of a cache are split over the devices.

    Args:
      xs: a cache ``[n, ...]`` (a device array, possibly split over a mesh by samples).

    Returns:
      ``(devices splitting xs's samples, the sharding of a leading group axis)``; ``(1, None)``
      when not split.
    """
    sh = getattr(xs, "sharding", None)
    if not isinstance(sh, NamedSharding) or not len(sh.spec) or sh.spec[0] is None:
        return 1, None
    return xs.shape[0] // sh.shard_shape(xs.shape)[0], NamedSharding(sh.mesh, PartitionSpec(sh.spec[0]))


def split_samples(fn: Any, xs: jnp.ndarray, *others: Any, groups: int, axes: Any) -> Any:
    """``fn(xs, *others)`` run as ``groups`` independent sample loops, one per device (vmapped over groups; traced).

    Args:
      fn: ``fn(xs_part, *others_part)`` on ``n / groups`` samples.
      xs, others: arrays ``[n, ...]`` (an ``others`` entry may be None).
      groups: the number of sample groups (from :func:`sample_groups`).
      axes: the NamedSharding of the leading group axis (from :func:`sample_groups`).

    Returns:
      ``fn``'s outputs with a leading group axis ``[groups, ...]``.
    """
    def grouped(x: Any) -> Any:
        if x is None:
            return None
        g = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        return jax.lax.with_sharding_constraint(g, axes)
    return jax.vmap(fn)(grouped(xs), *(grouped(o) for o in others))


def _block_fn(layer_params: Mapping[str, Any], config: ModelConfig, lora: Lora | None,
              layer_idx: int | None) -> Any:
    """Samples ``[k, s, D]`` (any float dtype) through the block in the layer's precision."""

    def run(x: jnp.ndarray) -> jnp.ndarray:
        return block_forward(layer_params, x.astype(_compute_dtype(layer_params)), config, lora=lora,
                             layer_idx=layer_idx)

    return run


def samples_per_pass(n: int, seqlen: int) -> int:
    """Samples per loop iteration of the gradient-free block passes (:func:`run_block`, :func:`block_error`).

    Args:
      n: samples in the pass.
      seqlen: tokens per sample.

    Returns:
      The largest divisor of ``n`` whose samples hold at most :data:`PASS_TOKENS` tokens (at
      least 1): larger products than one sample at a time on short samples, the same values
      (each sample's rows are computed alike), and never more than one sample beyond
      ``PASS_TOKENS`` tokens of activations.
    """
    cap = max(1, PASS_TOKENS // seqlen)
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _compute_dtype(layer_params: Mapping[str, Any]) -> Any:
    w = layer_params["q_proj"]
    return jnp.dtype(w.dtype) if isinstance(w, QuantizedTensor) else w.dtype


def _run_block(layer_params, xs, config, lora=None, layer_idx=None):
    """Samples ``[i k, (i + 1) k)`` read from the carry, then overwritten with their outputs (in place
    when ``xs`` is donated); ``k`` = :func:`samples_per_pass`."""
    run = _block_fn(layer_params, config, lora, layer_idx)
    k = samples_per_pass(xs.shape[0], xs.shape[1])

    def body(i: jnp.ndarray, xs: jnp.ndarray) -> jnp.ndarray:
        y = run(jax.lax.dynamic_slice_in_dim(xs, i * k, k)).astype(xs.dtype)
        return jax.lax.dynamic_update_slice_in_dim(xs, y, i * k, 0)

    return jax.lax.fori_loop(0, xs.shape[0] // k, body, xs)


def _run_block_split(layer_params, xs, config, lora=None, layer_idx=None, groups=1, axes=None):
    """:func:`_run_block` with the samples split in ``groups`` over the mesh axes ``axes``."""
    out = split_samples(lambda x: _run_block(layer_params, x, config, lora, layer_idx), xs, groups=groups, axes=axes)
    return out.reshape(xs.shape)


_run_block_jit = jax.jit(_run_block, static_argnames=("config", "layer_idx"))
_run_block_donating = jax.jit(_run_block, static_argnames=("config", "layer_idx"), donate_argnames=("xs",))
_SPLIT_STATIC = ("config", "layer_idx", "groups", "axes")
_run_block_split_jit = jax.jit(_run_block_split, static_argnames=_SPLIT_STATIC)
_run_block_split_donating = jax.jit(_run_block_split, static_argnames=_SPLIT_STATIC, donate_argnames=("xs",))


def run_block(layer_params: Mapping[str, Any], xs: jnp.ndarray, config: ModelConfig, lora: Lora | None = None,
              layer_idx: int | None = None, *, consume: bool = False) -> jnp.ndarray:
    """Apply one decoder block to every sample of ``xs`` (:func:`samples_per_pass` at a time, one program).

    Each sample is computed in the layer's precision (float32 for the dense float32 views
    calibration trains on) and stored back in the cache dtype of ``xs``; a float32 cache is
    exact. With ``consume`` the input buffer is donated and overwritten as it is read,
    so the call needs no second ``[n, seqlen, D]`` buffer (``xs`` is unusable afterwards).

    Args:
      layer_params: the layer's dict (linears dense or QuantizedTensor).
      xs: block inputs ``[n, seqlen, D]`` (the activation cache; any float dtype). A host
        numpy array is an offloaded cache: it is streamed through the device in chunks of
        samples (:func:`host_chunks`) and the outputs come back to the host.
      config: the model config (static).
      lora: that layer's :class:`~apiq_jax.lora.Lora`, or None.
      layer_idx: the layer index where the config mixes attention kinds (static), else None.
      consume: donate ``xs`` and write the outputs into its buffer (on the host: in place).

    Returns:
      The block outputs ``[n, seqlen, D]`` in ``xs``'s dtype (a host array for a host ``xs``).
    """
    if isinstance(xs, np.ndarray):  # offloaded cache: streamed to the device a chunk of samples at a time
        out = xs if consume else np.empty_like(xs)
        for c in host_chunks(xs):
            out[c] = np.asarray(_run_block_donating(layer_params, jnp.asarray(xs[c]), config, lora, layer_idx=layer_idx))
        return out
    groups, axes = sample_groups(xs)
    if groups > 1:  # samples split over the mesh: one loop per device
        fn = _run_block_split_donating if consume else _run_block_split_jit
        return fn(layer_params, xs, config, lora, layer_idx=layer_idx, groups=groups, axes=axes)
    fn = _run_block_donating if consume else _run_block_jit
    return fn(layer_params, xs, config, lora, layer_idx=layer_idx)


def _error_sums(layer_params, xs, targets, config, lora=None, layer_idx=None):
    run = _block_fn(layer_params, config, lora, layer_idx)
    k = samples_per_pass(xs.shape[0], xs.shape[1])

    def body(i, acc):
        y = run(jax.lax.dynamic_slice_in_dim(xs, i * k, k)).astype(targets.dtype).astype(jnp.float32)
        t = jax.lax.dynamic_slice_in_dim(targets, i * k, k).astype(jnp.float32)
        sums = jnp.stack([jnp.sum((t - y) ** 2, axis=(1, 2)), jnp.sum(t * t, axis=(1, 2))])  # [2, k]
        return jax.lax.dynamic_update_slice_in_dim(acc, sums, i * k, 1)

    return jax.lax.fori_loop(0, xs.shape[0] // k, body, jnp.zeros((2, xs.shape[0]), jnp.float32))


@partial(jax.jit, static_argnames=("config", "layer_idx", "groups", "axes"))
def _error_sums_jit(layer_params, xs, targets, config, lora=None, layer_idx=None, groups=1, axes=None):
    if groups == 1:
        return _error_sums(layer_params, xs, targets, config, lora, layer_idx)
    sums = split_samples(lambda x, t: _error_sums(layer_params, x, t, config, lora, layer_idx), xs, targets,
                          groups=groups, axes=axes)  # [groups, 2, n / groups]
    return jnp.moveaxis(sums, 0, 1).reshape(2, xs.shape[0])


@jax.jit
def _stream_sums(targets, ys):
    t = targets.astype(jnp.float32)
    d = t - ys.astype(jnp.float32)
    axes = tuple(range(1, t.ndim))
    return jnp.stack([jnp.sum(d * d, axis=axes), jnp.sum(t * t, axis=axes)])


def _ratio(sums: jnp.ndarray) -> float:
    num, den = np.asarray(sharding.to_host(sums), np.float64)  # split over processes: gathered
    return float(num.sum() / den.sum())


def block_error(layer_params: Mapping[str, Any], xs: jnp.ndarray, targets: jnp.ndarray, config: ModelConfig,
                lora: Lora | None = None, layer_idx: int | None = None) -> float:
    """Relative error of the block's outputs on ``xs`` against ``targets``, on the device.

    ``sum ||targets - F(xs)||^2 / sum ||targets||^2``: each sample's two sums in float32 on
    the device (the outputs are never stored), combined over samples in float64 on the host
    (only ``2 n`` scalars leave the device).

    Args:
      layer_params: the layer's dict.
      xs: block inputs ``[n, seqlen, D]``.
      targets: the reference outputs ``[n, seqlen, D]``.
      config: the model config.
      lora: that layer's :class:`~apiq_jax.lora.Lora`, or None.
      layer_idx: see :func:`run_block`.

    Returns:
      The relative squared error as a Python float.
    """
    if isinstance(xs, np.ndarray):  # offloaded caches: summed a chunk of samples at a time
        return _ratio(np.concatenate([np.asarray(_error_sums_jit(
            layer_params, jnp.asarray(xs[c]), jnp.asarray(targets[c]), config, lora, layer_idx=layer_idx))
            for c in host_chunks(xs)], axis=1))
    groups, axes = sample_groups(xs)
    return _ratio(_error_sums_jit(layer_params, xs, targets, config, lora, layer_idx=layer_idx, groups=groups,
                                  axes=axes))


def stream_error(targets: jnp.ndarray, ys: jnp.ndarray) -> float:
    """``sum ||targets - ys||^2 / sum ||targets||^2`` with per-sample float32 sums on the device.

    Args:
      targets: the reference activations ``[n, ...]``.
      ys: the activations to compare (same shape).

    Returns:
      The relative squared error as a Python float (per-sample sums combined in float64).
    """
    if isinstance(ys, np.ndarray):  # offloaded caches
        return _ratio(np.concatenate([np.asarray(_stream_sums(jnp.asarray(targets[c]), jnp.asarray(ys[c])))
                                      for c in host_chunks(ys)], axis=1))
    return _ratio(_stream_sums(targets, ys))


#: bytes of one transfer of an offloaded cache to the device (a whole number of samples, at least one)
HOST_CHUNK_BYTES = 64 * 2**20


def host_chunks(xs: np.ndarray) -> list[slice]:
    """The sample ranges an offloaded cache ``[n, ...]`` is streamed to the device in.

    Args:
      xs: the host cache.

    Returns:
      Consecutive slices covering ``[0, n)``, each at most :data:`HOST_CHUNK_BYTES` (but at
      least one sample).
    """
    n = xs.shape[0]
    step = max(1, HOST_CHUNK_BYTES // max(1, xs[:1].nbytes))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def embed_ids_host(params: Mapping[str, Any], ids: Any, config: ModelConfig, dtype: Any = None) -> np.ndarray:
    """:func:`embed_ids` into a host array (an offloaded cache), a chunk of samples at a time.

    Args:
      params: model params (only ``embed_tokens`` is read).
      ids: int ids ``[n, seqlen]``.
      config: the model config.
      dtype: the cache dtype (None: the embeddings').

    Returns:
      ``[n, seqlen, D]`` host array of ``dtype``.
    """
    ids, table = np.asarray(ids), _embed_table(params)
    if dtype is None:
        dtype = jax.eval_shape(partial(_embed_jit, config=config), table, jax.ShapeDtypeStruct((1, 1), jnp.int32)).dtype
    out = np.empty((*ids.shape, config.hidden_size), jnp.dtype(dtype))
    for c in host_chunks(out):
        out[c] = np.asarray(_embed_jit(table, jnp.asarray(ids[c], jnp.int32), config).astype(dtype))
    return out


def layer_idx_arg(config: ModelConfig, i: int) -> int | None:
    """The ``layer_idx`` to pass for block ``i``: only where the config mixes attention kinds.

    Uniform configs ignore the index, so passing None keeps one compiled program for all blocks.

    Args:
      config: the model config.
      i: the block index.

    Returns:
      ``i`` or None.
    """
    if config.layer_types is not None and len(set(config.layer_types)) > 1:
        return i
    return None


def as_float32(layer: Mapping[str, Any]) -> dict[str, Any]:
    """Every array of a dense layer cast to float32 (the precision calibration trains in).

    Under :func:`jax.set_mesh` with an ``"fsdp"`` axis above 1 each array is split over it
    by the rules of :func:`apiq_jax.sharding.tree_specs` (FSDP of a block too big for one
    device): it is read and cast on the host and sent to its shards, never whole to one device.
    A mesh spanning several processes gets global arrays the same way
    (:func:`apiq_jax.sharding.placement_mesh`).

    Args:
      layer: a layer's dict of arrays (or lazily read tensors).

    Returns:
      A new dict with float32 arrays.
    """
    mesh = sharding.placement_mesh()
    if mesh is None:
        return {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}
    specs = sharding.tree_specs({k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in layer.items()},
                                mesh.shape["fsdp"])
    # in sorted order: every process must place the same tensor at the same time (a layer's dict
    # order may differ between processes)
    placed = {k: jax.device_put(np.asarray(layer[k], np.float32), NamedSharding(mesh, specs[k])) for k in sorted(layer)}
    return {k: placed[k] for k in layer}


def float32_view(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A (partly) frozen layer as float32 computations see it.

    QuantizedTensors keep their codes and constants and dequantize to float32; dense arrays
    are cast. Nothing is quantized again.

    Args:
      layer: a layer's dict (dense arrays and QuantizedTensors).

    Returns:
      A new dict.
    """
    return {
        k: dataclasses.replace(v, dtype="float32") if isinstance(v, QuantizedTensor) else jnp.asarray(v, jnp.float32)
        for k, v in layer.items()
    }


def freeze_layer(
    layer: Mapping[str, Any],
    quant_config: QuantConfig,
    clips: Mapping[str, ClipLogits] | None = None,
    targets: Sequence[str] = LINEARS,
    *,
    where: str = "layer",
    dtype: Any = None,
) -> dict[str, Any]:
    """One layer with its ``targets`` quantized by :func:`apiq_jax.quant.quantize` (compiled once per shape).

    Args:
      layer: the layer's dict (arrays, host arrays or lazily read tensors); targets that are
        already QuantizedTensors stay as they are.
      quant_config: the quantizer.
      clips: learned clipping logits per linear name; missing names are plain RTN.
      targets: the linears to quantize.
      where: how errors name the layer (e.g. ``"layers.3"``).
      dtype: the dtype the new QuantizedTensors dequantize to (the model's storage dtype
        when ``layer`` holds float32 views of 16-bit weights; the codes do not depend on it:
        the quantizer works in float32). None: each weight's own dtype.

    Returns:
      A new dict of device arrays (non-target entries read and kept in their dtype).

    Raises:
      ValueError: a non-finite weight, naming ``where`` and the linear.
    """
    clips = clips or {}
    out = {k: v if isinstance(v, QuantizedTensor) else jnp.asarray(v) for k, v in layer.items() if k not in targets}
    for name in targets:
        w = layer[name]
        if isinstance(w, QuantizedTensor):
            out[name] = w
            continue
        qt = quantize_weight(jnp.asarray(w), quant_config, clips.get(name), name=f"{where}.{name}")
        out[name] = qt if dtype is None else dataclasses.replace(qt, dtype=jnp.dtype(dtype).name)
    return {k: out[k] for k in layer}


def with_quantized(layer: Mapping[str, Any], quantized: Mapping[str, QuantizedTensor]) -> dict[str, Any]:
    """The frozen block: ``layer``'s norms and biases (read, in their dtype) with its linears from ``quantized``.

    Args:
      layer: the block's params as given (arrays or lazily read tensors).
      quantized: ``{name: QuantizedTensor}`` of its linears.

    Returns:
      A new dict in ``layer``'s key order.
    """
    return {k: quantized[k] if k in quantized else jnp.asarray(v) for k, v in layer.items()}


def fake_quant_layer(
    layer: Mapping[str, Any], clips: Mapping[str, ClipLogits], quant_config: QuantConfig, *, on_use: bool = False,
) -> dict[str, Any]:
    """The layer with every linear in ``clips`` fake-quantized (differentiable in the logits).

    Args:
      layer: the layer's dict with dense linears.
      clips: clipping logits per linear name.
      quant_config: the quantizer.
      on_use: each linear as a :class:`~apiq_jax.quant.FakeQuantWeight` instead: the same
        values and logit gradients in a block's forward pass, but quantized where it is used
        and, one linear at a time, for its gradient
        (:func:`~apiq_jax.quant.fake_quant_matmul`), so training holds one linear's quantizer
        rather than the whole block's; the dense weights then get no gradient. Blocks of at
        most :data:`KEEP_QUANTIZED_MAX_ELEMENTS` linear weights keep each ``Q(W)`` for the
        backward pass instead of recomputing it (faster; small next to the activations).

    Returns:
      A new dict (other entries shared).
    """
    out = dict(layer)
    keep = sum(math.prod(layer[n].shape) for n in clips) <= KEEP_QUANTIZED_MAX_ELEMENTS
    for name, clip in clips.items():
        w = layer[name]
        out[name] = FakeQuantWeight(w, clip, quant_config, keep) if on_use else fake_quantize(w, quant_config, clip=clip)
    return out
