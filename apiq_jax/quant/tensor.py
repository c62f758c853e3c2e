"""QuantizedTensor: bit-packed codes plus per-group constants, as a registered pytree."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.quant.blockwise import DoubleQuantized, double_dequantize, double_quantize
from apiq_jax.quant.clip import ClipLogits, as_clip_logits
from apiq_jax.quant.config import QuantConfig
from apiq_jax.quant.groups import from_groups, num_groups, to_groups
from apiq_jax.quant.packing import PACK_MULTIPLE, pack_codes, unpack_codes
from apiq_jax.quant.uniform import GroupParams, _check_weight, dequantize_groups, group_codes, group_params

LAYOUTS = ("storage", "kernel")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A weight ``[N, K]`` quantized group-wise along ``K``.

    Children (traced leaves):
      codes: uint32 ``[N, K_pack * bits / 32]``, the layout of :mod:`apiq_jax.quant.packing`;
        ``K_pack`` is ``n_groups * group_size`` rounded up to a multiple of 32.
      scales: ``[N, n_groups]`` in the config's scale dtype, or a :class:`DoubleQuantized`.
      zeros: for "asym", int16 ``[N, n_groups]`` (exact for the reference's [-1e4, 1e4]
        range); with double quantization the zero points are clamped to the code range
        and bit-packed like the codes. ``None`` for "sym" (constant ``2^(b-1)-1``) and "nf".
    Static aux data: logical ``shape``, the :class:`QuantConfig`, the dequantized ``dtype``,
    and the ``layout`` of the children:

    * ``"storage"`` (default): as above; what quantization produces and checkpoints hold.
    * ``"kernel"``: made by :func:`apiq_jax.qmatmul.prepare_params` for the matmul kernels,
      which alone read it. ``codes`` is a tuple of uint32 bit planes in the kernels' layout
      (the storage codes are not kept), ``scales`` and ``zeros`` (None for "sym") are the
      constants densified to padded float32 arrays. ``shape``, ``config`` and the
      properties are unchanged; everything that reads the storage arrays
      (:func:`dequantize`, :meth:`to_state_dict`, ...) raises ValueError on it.
    """

    codes: jnp.ndarray
    scales: Any
    zeros: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    config: QuantConfig = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    layout: str = dataclasses.field(default="storage", metadata=dict(static=True))

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not supported; accepted: {LAYOUTS}")

    def require_storage(self, what: str) -> None:
        """Raise ValueError unless the tensor is in the storage layout.

        Args:
          what: the operation that needs the storage arrays (named in the message).
        Returns:
          None.
        """
        if self.layout != "storage":
            raise ValueError(
                f"{what} needs a QuantizedTensor in the storage layout, but this one has layout="
                f"{self.layout!r} (made by apiq_jax.qmatmul.prepare_params for the matmul kernels); "
                "use the storage form it was prepared from (apiq_jax.qmatmul.dequantize and "
                "apiq_jax.qmatmul.qmatmul take either)"
            )

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def scheme(self) -> str:
        return self.config.scheme

    @property
    def double_quant(self) -> bool:
        return self.config.double_quant

    @property
    def group_size(self) -> int:
        """Resolved group size (``K`` when the config says one group per row)."""
        return self.config.resolve_group_size(self.shape[-1])

    @property
    def n_groups(self) -> int:
        return num_groups(self.shape[-1], self.group_size)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dense_scales(self) -> jnp.ndarray:
        """Scales as float32 (double quantization undone; storage layout).

        Returns:
          ``[..., n_groups]`` float32.

        Raises:
          ValueError: a tensor in the kernel layout.
        """
        self.require_storage("dense_scales()")
        if isinstance(self.scales, DoubleQuantized):
            return double_dequantize(self.scales)
        return self.scales.astype(jnp.float32)

    def dense_zeros(self) -> jnp.ndarray:
        """Zero points as float32 (constants for "sym", 0 for "nf"; storage layout).

        Returns:
          ``[..., n_groups]`` float32.

        Raises:
          ValueError: a tensor in the kernel layout.
        """
        self.require_storage("dense_zeros()")
        lead = self.shape[:-1]
        if self.scheme == "sym":
            return jnp.full((*lead, self.n_groups), 2 ** (self.bits - 1) - 1, jnp.float32)
        if self.scheme == "nf":
            return jnp.zeros((*lead, self.n_groups), jnp.float32)
        if self.zeros.dtype == jnp.uint32:  # double-quant layout: packed b-bit zero points
            return unpack_codes(self.zeros, self.bits)[..., : self.n_groups].astype(jnp.float32)
        return self.zeros.astype(jnp.float32)

    def unpacked_codes(self) -> jnp.ndarray:
        """Integer codes with the packing removed (padding included; storage layout).

        Returns:
          int32 ``[..., n_groups * group_size]``.

        Raises:
          ValueError: a tensor in the kernel layout.
        """
        self.require_storage("unpacked_codes()")
        return unpack_codes(self.codes, self.bits)[..., : self.n_groups * self.group_size]

    # --- serialization -------------------------------------------------------------------
    def to_state_dict(self) -> dict[str, np.ndarray]:
        """Every stored array by name, for safetensors (storage layout only).

        Returns:
          ``{name: numpy array}`` (codes, scales or scales.*, zeros).

        Raises:
          ValueError: a tensor in the kernel layout.
        """
        self.require_storage("saving (to_state_dict())")
        out = {"codes": np.asarray(self.codes)}
        if isinstance(self.scales, DoubleQuantized):
            out.update(
                {"scales.codes": np.asarray(self.scales.codes),
                 "scales.absmax": np.asarray(self.scales.absmax),
                 "scales.mean": np.asarray(self.scales.mean).reshape(1)}
            )
        else:
            out["scales"] = np.asarray(self.scales)
        if self.zeros is not None:
            out["zeros"] = np.asarray(self.zeros)
        return out

    def metadata(self) -> dict[str, Any]:
        """JSON-able static data that :meth:`from_state_dict` rebuilds the tensor with (storage layout only).

        Returns:
          ``{"shape", "dtype", "config"}``.

        Raises:
          ValueError: a tensor in the kernel layout.
        """
        self.require_storage("saving (metadata())")
        return {"shape": list(self.shape), "dtype": self.dtype, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_state_dict(cls, arrays: dict[str, Any], metadata: dict[str, Any]) -> "QuantizedTensor":
        """Inverse of :meth:`to_state_dict` + :meth:`metadata`.

        Args:
          arrays: the stored arrays by name.
          metadata: the static data.

        Returns:
          The :class:`QuantizedTensor` (storage layout).
        """
        cfg = QuantConfig(**metadata["config"])
        shape = tuple(int(s) for s in metadata["shape"])
        if "scales.codes" in arrays:
            n_groups = num_groups(shape[-1], cfg.resolve_group_size(shape[-1]))
            scales: Any = DoubleQuantized(
                jnp.asarray(arrays["scales.codes"]), jnp.asarray(arrays["scales.absmax"]),
                jnp.asarray(arrays["scales.mean"]).reshape(()), (*shape[:-1], n_groups), cfg.dq_block_size,
            )
        else:
            scales = jnp.asarray(arrays["scales"])
        zeros = jnp.asarray(arrays["zeros"]) if "zeros" in arrays else None
        return cls(jnp.asarray(arrays["codes"]), scales, zeros, shape, cfg, metadata["dtype"])


def _pad_to_pack(codes: jnp.ndarray) -> jnp.ndarray:
    pad = (-codes.shape[-1]) % PACK_MULTIPLE
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    return codes


def _check_finite(w: jnp.ndarray) -> None:
    if isinstance(w, jax.core.Tracer):
        return  # values unknown while tracing; callers under jit validate beforehand
    bad = ~np.isfinite(np.asarray(w, dtype=np.float32))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"weight contains {int(bad.sum())} non-finite value(s) (first at index {idx}: "
            f"{np.asarray(w)[idx]}); quantization needs finite weights"
        )


def quantize(w: jnp.ndarray, cfg: QuantConfig, *, clip: ClipLogits | None = None) -> QuantizedTensor:
    """Quantize a 2-D weight ``[N, K]`` group-wise along ``K`` into bit-packed storage.

    The one route from a dense weight to a :class:`QuantizedTensor` (RTN when ``clip`` is
    None, ApiQ's learned clipping otherwise). Without double quantization
    ``dequantize(quantize(w, cfg, clip=c))`` equals ``fake_quantize(w, cfg, clip=c)``
    exactly. With it, the scales are stored in 8 bits and the codes are chosen against the
    stored (double-dequantized) scales.

    Args:
      w: float weight ``[N, K]``.
      cfg: the quantization config.
      clip: optional :class:`~apiq_jax.quant.ClipLogits` ``[N, n_groups]`` each.

    Returns:
      The :class:`QuantizedTensor` (storage layout, dequantizing to ``w``'s dtype).

    Raises:
      ValueError: a weight that is not 2-D or not finite, or wrongly shaped clip logits.

    Example:
      >>> import jax
      >>> from apiq_jax.quant import QuantConfig, bits_per_param, quantize
      >>> w = jax.random.normal(jax.random.key(0), (8, 128)) * 0.02     # [out, in]
      >>> qt = quantize(w, QuantConfig(bits=2, group_size=64))
      >>> qt.codes.shape, qt.codes.dtype.name, qt.scales.shape        # 16 codes per uint32 word
      ((8, 8), 'uint32', (8, 2))
      >>> bits_per_param(qt)                                           # 2-bit codes + fp16 scale and zero
      2.5
    """
    if getattr(w, "ndim", None) != 2:
        raise ValueError(
            f"quantize expects a 2-D weight [out, in], got shape {getattr(w, 'shape', None)}; "
            "use fake_quantize or jax.vmap for other ranks"
        )
    clip = as_clip_logits(clip)
    _check_weight(w, cfg, clip)
    _check_finite(w)
    gs = cfg.resolve_group_size(w.shape[-1])
    groups = jax.lax.stop_gradient(to_groups(w, gs))
    params = group_params(groups, cfg, None if clip is None else jax.tree.map(jax.lax.stop_gradient, clip))
    if not cfg.double_quant:
        codes = group_codes(groups, params, cfg)
        return from_codes(codes.reshape(*codes.shape[:-2], -1), params.scale[..., 0], params.zero[..., 0],
                          tuple(w.shape), cfg, w.dtype)
    scales = double_quantize(params.scale[..., 0], cfg.dq_block_size)
    zero = jnp.clip(params.zero, 0, cfg.qmax) if cfg.scheme == "asym" else params.zero
    params = GroupParams(double_dequantize(scales)[..., None], zero)
    zeros = pack_codes(_pad_to_pack(zero[..., 0].astype(jnp.uint32)), cfg.bits) if cfg.scheme == "asym" else None
    codes = group_codes(groups, params, cfg).astype(jnp.uint32)
    packed = pack_codes(_pad_to_pack(codes.reshape(*codes.shape[:-2], -1)), cfg.bits)
    return QuantizedTensor(packed, scales, zeros, tuple(w.shape), cfg, jnp.dtype(w.dtype).name)


def from_codes(
    codes: jnp.ndarray, scales: jnp.ndarray, zeros: jnp.ndarray | None, shape: tuple[int, ...],
    cfg: QuantConfig, dtype: Any,
) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from integer codes chosen by the caller (:func:`quantize`, GPTQ).

    Lays the codes and constants out exactly as :func:`quantize` stores them: codes padded
    to a multiple of 32 and bit-packed, scales in ``cfg.scale_dtype``, int16 zero points
    for "asym" (none for "sym" and "nf"). The caller is responsible for codes that are
    consistent with the constants (``dequantize`` returns ``(codes - zeros) * scales``, or
    the NormalFloat level times the scale).

    Args:
      codes: integer-valued codes ``[N, n_groups * group_size]`` in ``[0, 2^bits - 1]``.
      scales: per-group scales ``[N, n_groups]`` (already rounded to ``cfg.scale_dtype``).
      zeros: per-group zero points ``[N, n_groups]`` for "asym"; ignored otherwise.
      shape: the logical weight shape ``(N, K)``.
      cfg: the quantization config (without double quantization).
      dtype: the dtype :func:`dequantize` returns.

    Returns:
      The :class:`QuantizedTensor` (storage layout).

    Raises:
      ValueError: ``cfg.double_quant`` (the stored scales would differ from ``scales``).
    """
    if cfg.double_quant:
        raise ValueError("from_codes stores exact per-group scales; use double_quant=False (or quantize())")
    packed = pack_codes(_pad_to_pack(codes.astype(jnp.uint32)), cfg.bits)
    zero_points = zeros.astype(jnp.int16) if cfg.scheme == "asym" else None
    return QuantizedTensor(packed, scales.astype(cfg.jnp_scale_dtype), zero_points, tuple(shape), cfg,
                           jnp.dtype(dtype).name)


def dequantize(qt: QuantizedTensor) -> jnp.ndarray:
    """The dense weight that ``qt`` stores.

    Args:
      qt: a QuantizedTensor in the storage layout.

    Returns:
      ``[N, K]`` in ``qt.dtype``.

    Raises:
      ValueError: a tensor in the kernel layout.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from apiq_jax.quant import QuantConfig, dequantize, fake_quantize, quantize
      >>> w = jax.random.normal(jax.random.key(0), (8, 128)) * 0.02
      >>> cfg = QuantConfig(bits=2, group_size=64)
      >>> w_hat = dequantize(quantize(w, cfg))
      >>> w_hat.shape, int(jnp.unique(w_hat[0, :64]).size) <= 4    # at most 2^2 levels per group
      ((8, 128), True)
      >>> bool(jnp.array_equal(w_hat, fake_quantize(w, cfg)))         # exactly the fake-quantized weight
      True
    """
    qt.require_storage("quant.dequantize()")
    lead, k = qt.shape[:-1], qt.shape[-1]
    codes = qt.unpacked_codes().astype(jnp.float32).reshape(*lead, qt.n_groups, qt.group_size)
    params = GroupParams(qt.dense_scales()[..., None], qt.dense_zeros()[..., None])
    return from_groups(dequantize_groups(codes, params, qt.config), k).astype(qt.dtype)


def bits_per_param(qt: QuantizedTensor) -> float:
    """Every stored bit per weight: packed codes incl. padding, scales, zeros, nested constants.

    Args:
      qt: a QuantizedTensor in the storage layout.

    Returns:
      Stored bits divided by the number of weights.

    Raises:
      ValueError: a tensor in the kernel layout.
    """
    qt.require_storage("bits_per_param()")
    bits = qt.codes.size * 32
    if isinstance(qt.scales, DoubleQuantized):
        bits += qt.scales.storage_bits()
    else:
        bits += qt.scales.size * jnp.dtype(qt.scales.dtype).itemsize * 8
    if qt.zeros is not None:
        bits += qt.zeros.size * jnp.dtype(qt.zeros.dtype).itemsize * 8
    return bits / math.prod(qt.shape)
