"""The Hugging Face GPTQ tensor layout (AutoGPTQ / GPTQModel / transformers / vLLM), both ways.

One linear ``W [N=out, K=in]`` quantized in groups of ``g`` along ``K`` is stored as:

* ``qweight`` int32 ``[K * bits / 32, N]``: the codes ``q[k, n]`` packed along the input
  dimension. Every 32 consecutive codes of a column form one little-endian bit stream of
  ``bits`` words; code ``j`` occupies stream bits ``[bits*j, bits*j + bits)`` (for 2/4/8
  bits this is ``32/bits`` fields per word; for 3 bits it is AutoGPTQ's layout, where
  codes 10 and 21 straddle words).
* ``qzeros`` int32 ``[K / g, N * bits / 32]``: the zero points packed the same way along
  the output dimension. ``checkpoint_format: gptq`` (v1) stores ``zero - 1``,
  ``gptq_v2`` stores ``zero``.
* ``scales`` float16 ``[K / g, N]``; ``g_idx`` int32 ``[K]``: the group of every input row
  (``k // g`` without act-order).

The weight is ``(q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``, which is ApiQ's
``(q - z) * s`` with the same integers.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from apiq_jax.quant import QuantConfig, QuantizedTensor
from apiq_jax.quant.tensor import from_codes

#: bit widths the GPTQ layout stores
GPTQ_BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` values: v1 stores zero points minus one, v2 stores them as they are
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_MASK32 = np.uint64(0xFFFFFFFF)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers in ``[0, 2^bits)`` along axis 0 into int32 words (the GPTQ bit stream).

    Args:
      values: integers ``[R, C]`` with ``R * bits`` a multiple of 32 (``R`` a multiple
        of 32 for 3 bits).
      bits: 2, 3, 4 or 8.

    Returns:
      int32 ``[R * bits / 32, C]``.

    Raises:
      ValueError: other bit widths, ``R`` that does not fill whole words, values out of range.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits={bits} cannot be stored in the GPTQ layout; accepted: {GPTQ_BITS}")
    v = np.asarray(values).astype(np.int64)
    r, c = v.shape
    if (r * bits) % 32 or (bits == 3 and r % 32):
        raise ValueError(f"{r} rows of {bits}-bit values do not fill whole 32-bit words")
    if v.min(initial=0) < 0 or v.max(initial=0) >= 2**bits:
        raise ValueError(f"values outside [0, {2**bits - 1}] cannot be packed in {bits} bits")
    n_words = r * bits // 32
    pad = -r % 32
    v = np.pad(v, ((0, pad), (0, 0)))
    chunks = v.astype(np.uint64).reshape((r + pad) // 32, 32, c)
    words = np.zeros(((r + pad) // 32, bits, c), np.uint64)
    for j in range(32):
        pos = bits * j
        w, off = divmod(pos, 32)
        words[:, w] |= (chunks[:, j] << np.uint64(off)) & _MASK32
        if off + bits > 32:
            words[:, w + 1] |= chunks[:, j] >> np.uint64(32 - off)
    return words.reshape(-1, c)[:n_words].astype(np.uint32).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`.

    Args:
      words: int32 ``[R * bits / 32, C]``.
      bits: 2, 3, 4 or 8.

    Returns:
      int32 ``[R, C]`` in ``[0, 2^bits)``.

    Raises:
      ValueError: other bit widths, or (3 bits) a row count that is not a multiple of 3.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits={bits} cannot be read from the GPTQ layout; accepted: {GPTQ_BITS}")
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    if bits == 3 and w.shape[0] % 3:
        raise ValueError(f"{w.shape[0]} packed rows of 3-bit values is not a multiple of 3")
    r = w.shape[0] * 32 // bits
    w = np.pad(w, ((0, -w.shape[0] % bits), (0, 0)))
    w = w.reshape(w.shape[0] // bits, bits, w.shape[1])
    mask = np.uint64(2**bits - 1)
    out = np.zeros((w.shape[0], 32, w.shape[2]), np.uint64)
    for j in range(32):
        i, off = divmod(bits * j, 32)
        val = w[:, i] >> np.uint64(off)
        if off + bits > 32:
            val |= w[:, i + 1] << np.uint64(32 - off)
        out[:, j] = val & mask
    return out.reshape(-1, w.shape[2])[:r].astype(np.int32)


def check_gptq_compatible(qt: QuantizedTensor, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``qt`` can be written in the GPTQ layout exactly.

    Args:
      qt: a QuantizedTensor (storage layout).
      name: the linear's flat name, for the message.

    Returns:
      None.

    Raises:
      ValueError: a scheme, bit width, group size, shape or scale dtype GPTQ cannot hold.
    """
    cfg = qt.config
    n, k = qt.shape
    if cfg.scheme not in ("asym", "sym") or cfg.double_quant:
        raise ValueError(f"{name}: scheme {cfg.scheme!r} (double_quant={cfg.double_quant}) has no GPTQ form; "
                         "accepted: uniform 'asym' or 'sym' without double quantization")
    if cfg.bits not in GPTQ_BITS:
        raise ValueError(f"{name}: bits={cfg.bits}; GPTQ stores {GPTQ_BITS}")
    if cfg.scale_dtype != "float16":
        raise ValueError(f"{name}: scales are {cfg.scale_dtype}; GPTQ stores float16 scales, so the export would "
                         "not be exact; accepted: scale_dtype float16")
    g = qt.group_size
    if k % g or k % 32 or (n * cfg.bits) % 32 or (cfg.bits == 3 and n % 32):
        raise ValueError(
            f"{name}: shape [out={n}, in={k}] with group size {g} does not fit the GPTQ layout (in must be a "
            f"multiple of the group size and of 32, out a multiple of {32 if cfg.bits == 3 else 32 // cfg.bits})"
        )


def to_gptq(qt: QuantizedTensor, name: str, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """The GPTQ tensors of one quantized linear.

    Args:
      qt: a QuantizedTensor (storage layout) passing :func:`check_gptq_compatible`.
      name: the linear's flat name (error messages).
      checkpoint_format: "gptq" (v1, zero points minus one) or "gptq_v2".

    Returns:
      ``{"qweight", "qzeros", "scales", "g_idx"}`` as numpy arrays.

    Raises:
      ValueError: an incompatible tensor, or a zero point the chosen format cannot hold
        (naming the group).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; accepted: {CHECKPOINT_FORMATS}")
    check_gptq_compatible(qt, name)
    bits, g = qt.bits, qt.group_size
    n, k = qt.shape
    codes = np.asarray(qt.unpacked_codes())[:, :k]
    zeros = np.asarray(qt.dense_zeros()).astype(np.int64)  # [N, G]
    lo, hi = (1, 2**bits) if checkpoint_format == "gptq" else (0, 2**bits - 1)
    bad = np.argwhere((zeros < lo) | (zeros > hi))
    if bad.size:
        row, grp = (int(i) for i in bad[0])
        hint = " (write checkpoint_format gptq_v2, which stores it)" if checkpoint_format == "gptq" and \
            0 <= zeros[row, grp] < 2**bits else ""
        raise ValueError(
            f"{name}: group {grp} of row {row} has zero point {int(zeros[row, grp])}, outside the range "
            f"[{lo}, {hi}] that {checkpoint_format} stores in {bits} bits{hint}; {len(bad)} group(s) affected"
        )
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    return {
        "qweight": pack_rows(codes.T, bits),
        "qzeros": pack_rows(stored, bits).T.copy(),  # packed along the output dimension: [G, N*bits/32]
        "scales": np.asarray(qt.scales).astype(np.float16).T.copy(),
        "g_idx": (np.arange(k) // g).astype(np.int32),
    }


def from_gptq(
    arrays: dict[str, Any], bits: int, group_size: int, checkpoint_format: str, name: str, *,
    scheme: str = "asym", dtype: str = "float32", scale_dtype: str = "float16",
) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from the GPTQ tensors of one linear.

    Args:
      arrays: ``qweight``, ``qzeros``, ``scales`` and optionally ``g_idx``.
      bits: the checkpoint's bit width.
      group_size: its group size (-1: one group per row).
      checkpoint_format: "gptq" (v1) or "gptq_v2".
      name: the linear's name (error messages).
      scheme: "asym" (zero points kept per group), or "sym" when every zero point is
        ApiQ's ``2^(b-1) - 1``.
      dtype: the dtype the weight dequantizes to.
      scale_dtype: the dtype the scales are kept in ("float16" as GPTQ stores them;
        "bfloat16"/"float32" keep scales stored that way exactly).

    Returns:
      The QuantizedTensor (``[out, in]``, storage layout, scales in ``scale_dtype``).

    Raises:
      ValueError: missing tensors, inconsistent shapes, act-order ``g_idx``, or "sym"
        with other zero points.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"{name}: checkpoint_format {checkpoint_format!r}; accepted: {CHECKPOINT_FORMATS}")
    missing = [t for t in ("qweight", "qzeros", "scales") if t not in arrays]
    if missing:
        raise ValueError(f"{name}: missing GPTQ tensors {missing}")
    scales = np.asarray(arrays["scales"]).astype(jnp.dtype(scale_dtype))  # [G, N]
    codes = unpack_rows(np.asarray(arrays["qweight"]), bits)  # [K, N]
    k, n = codes.shape
    g = k if group_size in (-1, None) else int(group_size)
    if k % g or scales.shape != (k // g, n):
        raise ValueError(f"{name}: qweight holds [in={k}, out={n}] but scales are {tuple(scales.shape)}; "
                         f"expected ({k // g if g and k % g == 0 else '?'}, {n}) for group size {g}")
    zeros = unpack_rows(np.asarray(arrays["qzeros"]).T, bits).T  # [G, N]
    if zeros.shape != scales.shape:
        raise ValueError(f"{name}: qzeros unpack to {tuple(zeros.shape)}, scales are {tuple(scales.shape)}")
    if "g_idx" in arrays and not np.array_equal(np.asarray(arrays["g_idx"]), np.arange(k) // g):
        raise ValueError(f"{name}: g_idx is not in group order (act-order / desc_act checkpoint); only "
                         "desc_act: false checkpoints can be imported")
    zeros = zeros.astype(np.int64) + (1 if checkpoint_format == "gptq" else 0)
    cfg = QuantConfig(bits=bits, group_size=g, scheme=scheme, scale_dtype=scale_dtype)
    if scheme == "sym" and not (zeros == 2 ** (bits - 1) - 1).all():
        raise ValueError(f"{name}: scheme 'sym' needs every zero point to be {2 ** (bits - 1) - 1}")
    return from_codes(codes.T, scales.T, zeros.T if scheme == "asym" else None, (n, k), cfg, dtype)


__all__ = ["CHECKPOINT_FORMATS", "GPTQ_BITS", "check_gptq_compatible", "from_gptq", "pack_rows", "to_gptq",
           "unpack_rows"]
