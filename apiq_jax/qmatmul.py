"""``x @ W^T`` for a frozen :class:`QuantizedTensor` weight, without a dense weight in HBM.

Backends (``backend=`` of :func:`qmatmul`, a static string; None means
:func:`default_backend`: the ``APIQ_QMATMUL_BACKEND`` environment variable, else "auto"):

* ``"auto"``: ``"pallas"`` on GPU/TPU once the kernel has passed a one-time self-check
  against the XLA path there (:func:`kernel_self_check`; else a warning and ``"xla"``),
  ``"xla"`` on CPU (:func:`resolve_backend`).
* ``"pallas"``: the :mod:`pallas_kernels` Triton (GPU) / Mosaic (TPU) kernels; the input
  gradient runs the transposed kernel on the same packed weights (custom VJP).
* ``"xla"``: unpack + dequantize + cast fused by XLA into one pass producing the dot
  operand (no padded/sliced copy of the weight). Its custom VJP recomputes the
  dequantization from the packed codes for the input gradient ``dy @ W``: the only
  residual is the packed weight itself, so no dense ``[N, K]`` weight is ever kept for
  the backward pass (:func:`xla_matmul`).
* ``"interpret"``: the GPU Pallas kernel in Pallas' interpreter (CPU testing; slow).

The backend is resolved when a function is traced, so callers pass it down as a static
argument (entry points -> ``linear`` -> ``qmatmul(x, w, backend=backend)``); a resolved
name ("pallas", "xla", "interpret") and "auto"/None are both accepted at every level.

Layouts: a weight is a :class:`QuantizedTensor` in the storage layout (what quantization
and checkpoints give) or, after :func:`prepare_params`, in the kernel layout
(``layout="kernel"``: the packed words re-arranged once for the kernels, constants
densified; still a QuantizedTensor). :func:`qmatmul` and :func:`dequantize` take either;
saving and the storage-level functions of :mod:`apiq_jax.quant` refuse the kernel layout.

Fallbacks: the kernels take uniform 2/3/4-bit "asym"/"sym" weights whose group size is
32, 64, 128 or a multiple of 256 (:func:`kernel_supports`). Anything else ("nf", 8 bits,
other group sizes) silently runs the ``"xla"`` path (and :func:`prepare_params` leaves it
in the storage layout). Double-quantized scales (and packed zero points) are densified to
float32 ``[N, n_groups]`` first (small next to the codes).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from apiq_jax.quant import QuantizedTensor
from apiq_jax.quant import dequantize as _dequantize_storage
from apiq_jax.quant.uniform import GroupParams, dequantize_groups

BACKENDS = ("auto", "pallas", "xla", "interpret")
ENV_VAR = "APIQ_QMATMUL_BACKEND"


def _check_backend(name: Any, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"qmatmul backend {name!r} ({where}) is not supported; accepted: {BACKENDS}")
    return name


def default_backend() -> str:
    """The backend that ``backend=None`` means.

    Returns:
      ``$APIQ_QMATMUL_BACKEND`` when set (validated against ``BACKENDS``), else "auto".
    """
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_backend(env, f"from ${ENV_VAR}") if env else "auto"


def resolve_backend(backend: str | None) -> str:
    """The concrete backend that ``backend`` means on this machine.

    Args:
      backend: one of ``BACKENDS`` or None (:func:`default_backend`).
    Returns:
      "pallas", "xla" or "interpret": "auto" is "pallas" when jax's default backend is a
      GPU or TPU and the kernel passed its :func:`kernel_self_check` there, else "xla"; a
      concrete name is returned as is (``APIQ_QMATMUL_BACKEND=pallas`` skips the check).
    Raises ValueError for an unknown name, or "pallas" without a GPU/TPU.
    """
    name = default_backend() if backend is None else _check_backend(backend, "backend=")
    platform = jax.default_backend()
    if name == "auto":
        return "pallas" if platform in ("gpu", "tpu") and kernel_self_check(platform) else "xla"
    if name == "pallas" and platform not in ("gpu", "tpu"):
        raise ValueError(
            f"backend 'pallas' needs a GPU or TPU, but jax's default backend is {platform!r}; "
            "use 'interpret' (kernel in Pallas' interpreter) or 'xla' on this machine"
        )
    return name


#: (platform, device kind, interpret) -> whether the kernel passed its self-check in this process
_SELF_CHECKS: dict[tuple[str, str, bool], bool] = {}
_SELF_CHECK_LOCK = threading.Lock()
#: tolerance of the self-check: max |kernel - xla| <= SELF_CHECK_RTOL * max |xla| (float32 inputs;
#: a GPU may run float32 dots as TF32, ~1e-3 relative)
SELF_CHECK_RTOL = 1e-2


def kernel_self_check(platform: str, *, interpret: bool = False) -> bool:
    """Whether the Pallas kernel computes a small random product and its ``dx`` as the XLA path does.

    Run once per process and (platform, device kind); the result is cached. On a compile
    error or a mismatch beyond :data:`SELF_CHECK_RTOL`, one warning names the setting that
    forces a backend (``$APIQ_QMATMUL_BACKEND``) and False is returned ("auto" then uses the
    XLA path). Safe to call while a function is being traced (it runs eagerly).

    Args:
      platform: "gpu" or "tpu" (the kernel to check).
      interpret: check the kernel in Pallas' interpreter (CPU testing).

    Returns:
      True when the kernel agreed with the XLA path.
    """
    kind = jax.devices()[0].device_kind
    key = (platform, kind, interpret)
    with _SELF_CHECK_LOCK:
        if key not in _SELF_CHECKS:
            # in a thread of its own: jax's trace state is per thread, so a check first asked for
            # while a function is being traced runs eagerly instead of being staged into it
            result: list[tuple[bool, str]] = []
            worker = threading.Thread(target=lambda: result.append(_run_self_check(platform, interpret)))
            worker.start()
            worker.join()
            ok, why = result[0] if result else (False, "the check did not finish")
            if not ok:
                warnings.warn(
                    f"apiq_jax.qmatmul: the Pallas {platform} kernel failed its self-check on {kind!r} ({why}); "
                    f"backend 'auto' uses the XLA path instead. Set ${ENV_VAR}=xla to choose it explicitly, or "
                    f"${ENV_VAR}=pallas to force the kernel", RuntimeWarning, stacklevel=3)
            _SELF_CHECKS[key] = ok
        return _SELF_CHECKS[key]


def _run_self_check(platform: str, interpret: bool) -> tuple[bool, str]:
    """(passed, why not) of one kernel-vs-XLA comparison of ``y`` and ``dx``."""
    from apiq_jax.quant import QuantConfig, quantize

    try:
        kw, kx, kr = jax.random.split(jax.random.key(0), 3)
        qt = quantize(jax.random.normal(kw, (128, 256), jnp.float32), QuantConfig(bits=4, group_size=64))
        x = jax.random.normal(kx, (16, 256), jnp.float32)
        r = jax.random.normal(kr, (16, 128), jnp.float32)
        w = _kernel_weights(qt)

        def kernel(x):
            return jnp.sum(pallas_kernels.qmatmul(x, w, platform=platform, interpret=interpret) * r)

        def xla(x):
            return jnp.sum(xla_matmul(x, qt) * r)

        y_k = pallas_kernels.qmatmul(x, w, platform=platform, interpret=interpret)
        y_x = xla_matmul(x, qt)
        dx_k, dx_x = jax.grad(kernel)(x), jax.grad(xla)(x)
        errs = {name: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
                for name, a, b in (("y", y_k, y_x), ("dx", dx_k, dx_x))}
    except Exception as e:  # noqa: BLE001 - any failure to compile or run the kernel means: do not trust it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return False, f"{type(e).__name__}: {first}"
    bad = {k: v for k, v in errs.items() if not v <= SELF_CHECK_RTOL}
    if bad:
        return False, "relative error " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items()) + (
            f" > {SELF_CHECK_RTOL:g}")
    return True, ""


def kernel_supports(qt: QuantizedTensor) -> bool:
    """Whether the Pallas kernels can take ``qt`` (otherwise :func:`qmatmul` uses the XLA path).

    Args:
      qt: a QuantizedTensor in either layout.
    Returns:
      True for a 2-D weight whose bits / group size / scheme the kernels support.
    """
    if qt.ndim != 2:
        return False
    try:
        pallas_kernels.check_layout(qt.bits, qt.group_size, qt.scheme)
    except ValueError:
        return False
    return True


def _kernel_weights(qt: QuantizedTensor) -> pallas_kernels.PreparedWeights:
    """The kernels' view of ``qt``: re-arranged from the storage layout, or wrapped as is."""
    if qt.layout == "kernel":
        return pallas_kernels.PreparedWeights(
            planes=tuple(qt.codes), scales=qt.scales, zeros=qt.zeros, bits=qt.bits, group_size=qt.group_size,
            n=qt.shape[0], k=qt.shape[1], zero_point=2 ** (qt.bits - 1) - 1 if qt.scheme == "sym" else None,
        )
    zeros = None if qt.scheme == "sym" else (qt.zeros if not qt.double_quant else qt.dense_zeros())
    return pallas_kernels.prepare_weights(
        qt.codes, qt.dense_scales(), zeros,
        bits=qt.bits, k=qt.shape[1], group_size=qt.group_size, scheme=qt.scheme,
    )


def prepare(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` in the kernel layout (``layout="kernel"``, constants densified to float32).

    Args:
      qt: a 2-D QuantizedTensor the kernels support (:func:`kernel_supports`); one already
        in the kernel layout is returned as is.
    Returns:
      A QuantizedTensor with the same shape, config and dtype whose children are the
      kernel-layout arrays (the storage codes are not kept).
    Raises ValueError (naming the value) when the kernels cannot take ``qt``.
    """
    if qt.layout == "kernel":
        return qt
    if qt.ndim != 2:
        raise ValueError(f"prepare takes a 2-D QuantizedTensor, got shape {qt.shape}")
    w = _kernel_weights(qt)
    return QuantizedTensor(w.planes, w.scales, w.zeros, qt.shape, qt.config, qt.dtype, layout="kernel")


def prepare_params(frozen: Any) -> Any:
    """``frozen`` with every kernel-supported QuantizedTensor put in the kernel layout.

    The Pallas path otherwise re-arranges the packed words on every call (an extra pass
    over the codes); preparing once, outside ``jit``, lets the kernels read the stored bits
    directly. The result is for computing (``apply``/``forward``/training accept it), not
    for saving: :func:`apiq_jax.save_quantized` needs the storage layout.

    Args:
      frozen: any pytree (a params tree, or a single QuantizedTensor).
    Returns:
      The same tree; its prepared leaves are still QuantizedTensors (``layout="kernel"``),
      the others (dense arrays, weights the kernels do not take) are unchanged.
    """

    def convert(leaf: Any) -> Any:
        return prepare(leaf) if isinstance(leaf, QuantizedTensor) and kernel_supports(leaf) else leaf

    return jax.tree.map(convert, frozen, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def dequantize(qt: QuantizedTensor) -> jnp.ndarray:
    """The dense weight ``[N, K]`` (in ``qt.dtype``) of a QuantizedTensor in either layout.

    Args:
      qt: storage layout (:func:`apiq_jax.quant.dequantize`) or kernel layout (the
        kernels' pure-jnp reference dequantization; the same values).
    Returns:
      The dense weight in ``qt.dtype``.
    """
    if qt.layout == "kernel":
        return pallas_kernels.dequantize_prepared(_kernel_weights(qt)).astype(qt.dtype)
    return _dequantize_storage(qt)


def dense_operand(qt: QuantizedTensor, dtype: Any) -> jnp.ndarray:
    """The dense dot operand the XLA backend dequantizes ``qt`` into (inside the caller's program).

    Args:
      qt: the quantized weight ``[N, K]``.
      dtype: the operand's dtype (rounded through ``qt.dtype`` first, as dequantization does).

    Returns:
      ``[N, n_groups * group_size]`` (storage layout, padded columns included: pad the
      input's columns to match) or ``[N, K]`` (kernel layout).
    """
    if qt.layout == "kernel":
        return pallas_kernels.dequantize_prepared(_kernel_weights(qt)).astype(dtype)
    n = qt.shape[0]
    g, gs = qt.n_groups, qt.group_size
    codes = qt.unpacked_codes().reshape(n, g, gs).astype(jnp.float32)
    params = GroupParams(qt.dense_scales()[..., None], qt.dense_zeros()[..., None])
    w = dequantize_groups(codes, params, qt.config).astype(qt.dtype).astype(dtype)
    return w.reshape(n, g * gs)


def _xla_forward(x2d: jnp.ndarray, qt: QuantizedTensor) -> jnp.ndarray:
    w = dense_operand(qt, x2d.dtype)
    xp = jnp.pad(x2d, ((0, 0), (0, w.shape[1] - x2d.shape[1])))
    return jax.lax.dot_general(xp, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _xla_matmul(x2d: jnp.ndarray, qt: QuantizedTensor) -> jnp.ndarray:
    return _xla_forward(x2d, qt)


def _xla_matmul_fwd(x2d, qt):
    # residuals: the packed weight (an input, never a dense copy) and a zero-size array
    # carrying x's dtype into the backward
    return _xla_forward(x2d, qt), (qt, jnp.zeros((0,), x2d.dtype))


def _xla_matmul_bwd(res, dy):
    qt, proto = res
    w = dense_operand(qt, proto.dtype)  # recomputed from the codes, fused into the dot by XLA
    dx = jax.lax.dot_general(dy.astype(proto.dtype), w, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    # the frozen weight gets no cotangent (None: symbolically zero, integer codes included)
    return dx[:, : qt.shape[1]].astype(proto.dtype), None


_xla_matmul.defvjp(_xla_matmul_fwd, _xla_matmul_bwd)


def xla_matmul(x2d: jnp.ndarray, qt: QuantizedTensor) -> jnp.ndarray:
    """``x @ dequantize(qt)^T`` in float32 via XLA, with a backward that keeps no dense weight.

    Dequantization follows :func:`apiq_jax.quant.uniform.dequantize_groups` exactly (then a
    cast to ``x``'s dtype, as the dense model does). ``x`` is zero-padded to whole groups
    instead of slicing the padded weight, so XLA fuses unpack + dequantize + cast into one
    pass producing the dot operand (a 2-D dot: CPU XLA handles a 3-D contraction badly).
    A kernel-layout ``qt`` is dequantized with the kernels' reference instead.

    The custom VJP saves only the packed weight (``qt`` itself) and recomputes the
    dequantized operand in the backward for ``dx = dy @ W`` (accumulated in float32, cast
    to ``x``'s dtype); ``qt`` is frozen and gets no gradient.

    Args:
      x2d: activations ``[M, K]`` (any float dtype).
      qt: a 2-D QuantizedTensor ``[N, K]`` in either layout.
    Returns:
      float32 ``[M, N]``, differentiable with respect to ``x2d``.
    """
    return _xla_matmul(x2d, qt)


def qmatmul(
    x2d: jnp.ndarray,
    qt: QuantizedTensor,
    *,
    backend: str | None = None,
    block_sizes: pallas_kernels.BlockSizes | None = None,
) -> jnp.ndarray:
    """``x2d @ dequantize(qt)^T`` as float32 ``[M, N]`` (the caller casts).

    Args:
      x2d: activations ``[M, K]`` (float32 or bfloat16 for the kernels; any float for "xla").
      qt: a 2-D QuantizedTensor ``[N, K]`` in the storage layout or the kernel layout of
        :func:`prepare_params`.
      backend: "auto", "pallas", "xla", "interpret", or None for :func:`default_backend`;
        resolved by :func:`resolve_backend` when traced.
      block_sizes: tiles of the Pallas kernels for this call (None: the tuned/default
        table of :func:`pallas_kernels.block_sizes_for`); unused on the XLA path.
    Returns:
      float32 ``[M, N]``, differentiable with respect to ``x2d`` on every backend; ``qt``
      is treated as frozen by the kernels.
    Raises ValueError for an unknown backend, mismatched shapes or invalid block sizes.

    >>> import jax, numpy as np
    >>> from apiq_jax.quant import QuantConfig, quantize
    >>> qt = quantize(jax.random.normal(jax.random.key(0), (8, 64)), QuantConfig(bits=4, group_size=32))
    >>> x = jax.random.normal(jax.random.key(1), (2, 64))
    >>> y = qmatmul(x, qt, backend="xla")
    >>> y.shape, y.dtype
    ((2, 8), dtype('float32'))
    >>> prepared = prepare_params(qt)  # kernel layout, still a QuantizedTensor
    >>> prepared.layout, type(prepared).__name__
    ('kernel', 'QuantizedTensor')
    >>> y_kernel = qmatmul(x, prepared, backend="interpret")  # the Pallas kernel, interpreted
    >>> bool(np.allclose(y_kernel, y, rtol=1e-5, atol=1e-5))
    True
    """
    if not isinstance(qt, QuantizedTensor) or qt.ndim != 2:
        raise ValueError(f"qt must be a 2-D QuantizedTensor, got {type(qt).__name__} {getattr(qt, 'shape', None)}")
    if getattr(x2d, "ndim", None) != 2 or x2d.shape[1] != qt.shape[1]:
        raise ValueError(f"x2d must be [M, {qt.shape[1]}] for a weight of shape {qt.shape}, got {getattr(x2d, 'shape', None)}")
    name = resolve_backend(backend)
    kernel_dtype = jnp.dtype(x2d.dtype).name in pallas_kernels.X_DTYPES
    if name == "xla" or not kernel_supports(qt) or not kernel_dtype:
        return xla_matmul(x2d, qt)
    platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    return pallas_kernels.qmatmul(
        x2d, _kernel_weights(qt), platform=platform, interpret=name == "interpret", block_sizes=block_sizes
    )
