"""Textbook quantizers: absmax / zero-point INT8, block-wise quantization, double quantization.

These act on any tensor (flattened), as in the LLM.int8() and QLoRA papers:

* absmax INT8: ``c = 127 / absmax(x)``, ``x_q = round(c x)``, dequantize ``x_q / c``.
* zero-point INT8: ``s = 255 / (max - min)``, ``z = -round(s min) - 128``,
  ``x_q = clip(round(s x) + z, -128, 127)``, dequantize ``(x_q - z) / s``.
* block-wise: one absmax constant per block of the flattened tensor, codes either
  linear INT8 or a NormalFloat codebook.
* double quantization (QLoRA): the fp32 block constants are themselves quantized to
  8 bits in blocks of 256 after subtracting their mean.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from apiq_jax.quant.normalfloat import nf_codebook
from apiq_jax.quant.packing import pack_codes, unpack_codes


def absmax_quantize_int8(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Absmax INT8 of a whole tensor.

    Args:
      x: any float tensor.

    Returns:
      ``(x_q, c)``: int8 codes ``round(c x)`` and the float32 constant ``c = 127 / absmax(x)``.
    """
    absmax = jnp.max(jnp.abs(x))
    c = jnp.where(absmax > 0, 127.0 / absmax, 1.0).astype(jnp.float32)
    return jnp.round(c * x).astype(jnp.int8), c


def absmax_dequantize_int8(x_q: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`absmax_quantize_int8`.

    Args:
      x_q: int8 codes.
      c: the constant.

    Returns:
      float32 ``x_q / c``.
    """
    return x_q.astype(jnp.float32) / c


def zeropoint_quantize_int8(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Zero-point INT8 of a whole tensor over ``[-128, 127]``.

    Args:
      x: any float tensor.

    Returns:
      ``(x_q, scale, zero)``: int8 codes ``clip(round(scale x) + zero)``, ``scale = 255 /
      (max - min)`` and ``zero = -round(scale min) - 128``.
    """
    lo, hi = jnp.min(x), jnp.max(x)
    scale = jnp.where(hi > lo, 255.0 / (hi - lo), 1.0).astype(jnp.float32)
    zero = -jnp.round(scale * lo) - 128.0
    x_q = jnp.clip(jnp.round(scale * x) + zero, -128, 127)
    return x_q.astype(jnp.int8), scale, zero


def zeropoint_dequantize_int8(x_q: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`zeropoint_quantize_int8`.

    Args:
      x_q: int8 codes.
      scale, zero: the constants.

    Returns:
      float32 ``(x_q - zero) / scale``.
    """
    return (x_q.astype(jnp.float32) - zero) / scale


def _to_blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
    if block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    flat = x.reshape(-1).astype(jnp.float32)
    pad = (-flat.size) % block_size
    if pad:  # zero padding never raises a block's absmax
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A tensor quantized block-wise with one absmax per block.

    ``codes``: int32 code per element (padded to whole blocks), ``absmax``: float32 per
    block. ``codebook`` None means linear INT8 (``code / 127``), else a NormalFloat table.
    """

    codes: jnp.ndarray
    absmax: jnp.ndarray
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    nf_bits: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def blockwise_quantize(x: jnp.ndarray, block_size: int = 64, *, nf_bits: int | None = None) -> BlockQuantized:
    """Quantize the flattened ``x`` in blocks of ``block_size`` with per-block absmax.

    Args:
      x: any float tensor (flattened; the last block is zero-padded).
      block_size: elements per block.
      nf_bits: None gives linear INT8 codes in [-127, 127]; 2, 3 or 4 gives NormalFloat
        codes (indices into :func:`nf_codebook`).

    Returns:
      The :class:`BlockQuantized` codes and per-block absmax.

    Raises:
      ValueError: a block size that is not positive.
    """
    blocks = _to_blocks(x, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[:, None]
    v = blocks / safe
    if nf_bits is None:
        codes = jnp.round(v * 127.0).astype(jnp.int32)
    else:
        book = jnp.asarray(nf_codebook(nf_bits))
        codes = jnp.argmin(jnp.abs(v[..., None] - book), axis=-1).astype(jnp.int32)
    return BlockQuantized(codes, absmax, tuple(x.shape), block_size, nf_bits)


def blockwise_dequantize(bq: BlockQuantized) -> jnp.ndarray:
    """Inverse of :func:`blockwise_quantize`.

    Args:
      bq: the block-quantized tensor.

    Returns:
      float32 values in the original shape.
    """
    if bq.nf_bits is None:
        v = bq.codes.astype(jnp.float32) / 127.0
    else:
        v = jnp.asarray(nf_codebook(bq.nf_bits))[bq.codes]
    flat = (v * bq.absmax[:, None]).reshape(-1)
    return flat[: math.prod(bq.shape)].reshape(bq.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoubleQuantized:
    """Quantization constants stored in 8 bits (QLoRA double quantization).

    ``codes``: uint32 words packing one signed 8-bit code (offset by 128) per constant;
    ``absmax``: float32 per block of ``block_size`` constants; ``mean``: float32 scalar.
    """

    codes: jnp.ndarray
    absmax: jnp.ndarray
    mean: jnp.ndarray
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    def storage_bits(self) -> int:
        """Every stored bit: packed codes, per-block absmax and the mean.

        Returns:
          The number of bits.
        """
        return 32 * (self.codes.size + self.absmax.size + self.mean.size)


def double_quantize(constants: jnp.ndarray, block_size: int = 256) -> DoubleQuantized:
    """Quantize float constants to 8 bits in blocks after subtracting their mean.

    Args:
      constants: float constants of any shape (e.g. per-group scales).
      block_size: constants per 8-bit block.

    Returns:
      The :class:`DoubleQuantized` constants.
    """
    c = constants.astype(jnp.float32)
    mean = jnp.mean(c)
    bq = blockwise_quantize(c - mean, block_size)
    n = bq.codes.size
    padded = jnp.pad((bq.codes.reshape(-1) + 128).astype(jnp.uint32), (0, (-n) % 32))
    return DoubleQuantized(pack_codes(padded, 8), bq.absmax, mean, tuple(constants.shape), block_size)


def double_dequantize(dq: DoubleQuantized) -> jnp.ndarray:
    """Inverse of :func:`double_quantize`.

    Args:
      dq: the double-quantized constants.

    Returns:
      float32 constants in their original shape.
    """
    n_blocks = dq.absmax.shape[0]
    codes = unpack_codes(dq.codes, 8)[: n_blocks * dq.block_size] - 128
    bq = BlockQuantized(codes.reshape(n_blocks, dq.block_size), dq.absmax, dq.shape, dq.block_size)
    return blockwise_dequantize(bq) + dq.mean
