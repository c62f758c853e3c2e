"""``x @ W^T`` for a frozen :class:`QuantizedTensor` weight, without a dense weight in HBM.

Backends (pick per call with ``backend=``, or set the default with :func:`use_backend` or
the ``APIQ_QMATMUL_BACKEND`` environment variable; the context manager wins):

* ``"auto"`` (default): ``"pallas"`` on GPU/TPU, ``"xla"`` on CPU.
* ``"pallas"``: the :mod:`pallas_kernels` Triton (GPU) / Mosaic (TPU) kernels; the input
  gradient runs the transposed kernel on the same packed weights (custom VJP).
* ``"xla"``: unpack + dequantize + cast fused by XLA into one pass producing the dot
  operand (no padded/sliced copy of the weight); differentiable by ordinary autodiff.
* ``"interpret"``: the GPU Pallas kernel in Pallas' interpreter (CPU testing; slow).

Fallbacks: the kernels take uniform 2/3/4-bit "asym"/"sym" weights whose group size is
32, 64, 128 or a multiple of 256 (:func:`kernel_supports`). Anything else ("nf", 8 bits,
other group sizes) silently runs the ``"xla"`` path. Double-quantized scales (and packed
zero points) are densified to float32 ``[N, n_groups]`` first (small next to the codes).

The backend is chosen when a function is traced: under ``jax.jit`` a changed default
applies to new traces only (call ``jax.clear_caches()`` to re-trace cached functions).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from apiq_jax.quant import QuantizedTensor
from apiq_jax.quant.uniform import GroupParams, dequantize_groups

BACKENDS = ("auto", "pallas", "xla", "interpret")
ENV_VAR = "APIQ_QMATMUL_BACKEND"
_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("apiq_qmatmul_backend", default=None)


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"qmatmul backend {name!r} ({where}) is not supported; accepted: {BACKENDS}")
    return name


def default_backend() -> str:
    """The backend used when ``backend=None``: :func:`use_backend`, else ``$APIQ_QMATMUL_BACKEND``, else "auto"."""
    override = _BACKEND.get()
    if override is not None:
        return override
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_backend(env, f"from ${ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default qmatmul backend inside the ``with`` block."""
    token = _BACKEND.set(_check_backend(name, "use_backend"))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def kernel_supports(qt: QuantizedTensor) -> bool:
    """True when the Pallas kernels can take ``qt`` (otherwise qmatmul uses the XLA path)."""
    if qt.ndim != 2:
        return False
    try:
        pallas_kernels.check_layout(qt.bits, qt.group_size, qt.scheme)
    except ValueError:
        return False
    return True


def resolve_backend(backend: str | None) -> str:
    """The concrete backend ("pallas", "xla" or "interpret") that ``backend`` means here."""
    name = default_backend() if backend is None else _check_backend(backend, "backend=")
    platform = jax.default_backend()
    if name == "auto":
        return "pallas" if platform in ("gpu", "tpu") else "xla"
    if name == "pallas" and platform not in ("gpu", "tpu"):
        raise ValueError(
            f"backend 'pallas' needs a GPU or TPU, but jax's default backend is {platform!r}; "
            "use 'interpret' (kernel in Pallas' interpreter) or 'xla' on this machine"
        )
    return name


def prepare(qt: QuantizedTensor) -> pallas_kernels.PreparedWeights:
    """Kernel-layout copy of ``qt``'s packed weights (constants densified to float32)."""
    zeros = None if qt.scheme == "sym" else (qt.zeros if not qt.double_quant else qt.dense_zeros())
    return pallas_kernels.prepare_weights(
        qt.codes, qt.dense_scales(), zeros,
        bits=qt.bits, k=qt.shape[1], group_size=qt.group_size, scheme=qt.scheme,
    )


def xla_matmul(x2d: jnp.ndarray, qt: QuantizedTensor) -> jnp.ndarray:
    """``x @ dequantize(qt)^T`` in float32 via XLA.

    Dequantization follows :func:`apiq_jax.quant.uniform.dequantize_groups` exactly (then a
    cast to ``x``'s dtype, as the dense model does). ``x`` is zero-padded to whole groups
    instead of slicing the padded weight, so XLA fuses unpack + dequantize + cast into one
    pass producing the dot operand (a 2-D dot: CPU XLA handles a 3-D contraction badly).
    """
    n, k = qt.shape
    g, gs = qt.n_groups, qt.group_size
    codes = qt.unpacked_codes().reshape(n, g, gs).astype(jnp.float32)
    params = GroupParams(qt.dense_scales()[..., None], qt.dense_zeros()[..., None])
    w = dequantize_groups(codes, params, qt.config).astype(qt.dtype).astype(x2d.dtype)
    xp = jnp.pad(x2d, ((0, 0), (0, g * gs - k)))
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(xp, w.reshape(n, g * gs), dims, preferred_element_type=jnp.float32)


def prepare_params(frozen: Any) -> Any:
    """``frozen`` with every kernel-supported QuantizedTensor replaced by its kernel layout.

    The Pallas path otherwise re-arranges the packed words on every call (an extra pass
    over the codes); preparing once, outside ``jit``, lets the kernels read the stored bits
    directly. The result is for computing (``apply``/``forward``/training accept it), not
    for :func:`apiq_jax.save_quantized`, which takes the storage layout.
    """

    def convert(leaf: Any) -> Any:
        return prepare(leaf) if isinstance(leaf, QuantizedTensor) and kernel_supports(leaf) else leaf

    return jax.tree.map(convert, frozen, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def _prepared_matmul(x2d: jnp.ndarray, w: pallas_kernels.PreparedWeights, name: str) -> jnp.ndarray:
    if name == "xla" or jnp.dtype(x2d.dtype).name not in pallas_kernels.X_DTYPES:
        dense = pallas_kernels.dequantize_prepared(w).astype(x2d.dtype)
        return jax.lax.dot_general(x2d, dense, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    return pallas_kernels.qmatmul(x2d, w, platform=platform, interpret=name == "interpret")


def qmatmul(
    x2d: jnp.ndarray, qt: QuantizedTensor | pallas_kernels.PreparedWeights, *, backend: str | None = None
) -> jnp.ndarray:
    """``x2d @ dequantize(qt)^T`` as float32 ``[M, N]`` (the caller casts).

    Args:
      x2d: activations ``[M, K]`` (float32 or bfloat16 for the kernels; any float for "xla").
      qt: a 2-D QuantizedTensor ``[N, K]``, or its kernel layout from :func:`prepare_params`.
      backend: "auto", "pallas", "xla", "interpret" or None for :func:`default_backend`.
    Differentiable with respect to ``x2d`` on every backend; ``qt`` is treated as frozen
    by the kernels. Raises ValueError for an unknown backend or mismatched shapes.
    """
    if isinstance(qt, pallas_kernels.PreparedWeights):
        if getattr(x2d, "ndim", None) != 2 or x2d.shape[1] != qt.k:
            raise ValueError(f"x2d must be [M, {qt.k}] for a weight of shape {qt.shape}, got {getattr(x2d, 'shape', None)}")
        return _prepared_matmul(x2d, qt, resolve_backend(backend))
    if not isinstance(qt, QuantizedTensor) or qt.ndim != 2:
        raise ValueError(f"qt must be a 2-D QuantizedTensor, got {type(qt).__name__} {getattr(qt, 'shape', None)}")
    if getattr(x2d, "ndim", None) != 2 or x2d.shape[1] != qt.shape[1]:
        raise ValueError(f"x2d must be [M, {qt.shape[1]}] for a weight of shape {qt.shape}, got {getattr(x2d, 'shape', None)}")
    name = resolve_backend(backend)
    kernel_dtype = jnp.dtype(x2d.dtype).name in pallas_kernels.X_DTYPES
    if name == "xla" or not kernel_supports(qt) or not kernel_dtype:
        return xla_matmul(x2d, qt)
    platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    return pallas_kernels.qmatmul(x2d, prepare(qt), platform=platform, interpret=name == "interpret")
