"""Bit-packing of integer codes into uint32 words.

Layout (kernels in ``pallas_kernels`` read exactly this):

* 2, 4 and 8 bits: plain sequential fields. Word ``w`` holds codes
  ``w*(32/b) .. (w+1)*(32/b)-1``; code ``j`` of a word sits in bits ``[b*j, b*j+b)``
  (least significant first).
* 3 bits: chunks of 32 codes in 3 words, so no code straddles a word and storage is
  exactly 3 bits per code. Word 0 of a chunk holds the low 2 bits of codes 0..15
  (2-bit fields as above), word 1 the low 2 bits of codes 16..31, word 2 bit 2 of all
  32 codes (bit ``j`` is code ``j``'s high bit).

The packed axis is the last one and must have a length that is a multiple of 32.
"""

from __future__ import annotations

import jax.numpy as jnp

PACK_MULTIPLE = 32
PACKABLE_BITS = (1, 2, 3, 4, 8)


def _check(bits: int, k: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; accepted: {PACKABLE_BITS}")
    if k % PACK_MULTIPLE:
        raise ValueError(f"last axis length {k} must be a multiple of {PACK_MULTIPLE} to pack")


def _pack_fields(codes: jnp.ndarray, width: int) -> jnp.ndarray:
    per_word = 32 // width
    c = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], -1, per_word)
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * width).astype(jnp.uint32)
    # Fields are disjoint, so a sum equals a bitwise OR.
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)


def _unpack_fields(words: jnp.ndarray, width: int) -> jnp.ndarray:
    per_word = 32 // width
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * width).astype(jnp.uint32)
    mask = jnp.uint32(2**width - 1)
    fields = (words[..., None] >> shifts) & mask
    return fields.reshape(*words.shape[:-1], words.shape[-1] * per_word)


def packed_words(k: int, bits: int) -> int:
    """Number of uint32 words holding ``k`` codes of ``bits`` bits.

    Args:
      k: codes per row (a multiple of 32).
      bits: bits per code.

    Returns:
      ``k * bits / 32``.

    Raises:
      ValueError: bits that cannot be packed, or ``k`` not a multiple of 32.
    """
    _check(bits, k)
    return k * bits // 32


def pack_codes(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack integer codes in ``[0, 2^bits)`` along the last axis into uint32 words.

    Args:
      codes: integer codes ``[..., k]`` (k a multiple of 32).
      bits: bits per code (1, 2, 3, 4 or 8).

    Returns:
      uint32 words ``[..., k * bits / 32]`` in the layout of this module.

    Raises:
      ValueError: bits that cannot be packed, or ``k`` not a multiple of 32.
    """
    k = codes.shape[-1]
    _check(bits, k)
    if bits != 3:
        return _pack_fields(codes, bits)
    c = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], k // 32, 32)
    low = _pack_fields(c & jnp.uint32(3), 2)  # [..., chunks, 2]
    high = _pack_fields((c >> jnp.uint32(2)) & jnp.uint32(1), 1)  # [..., chunks, 1]
    return jnp.concatenate([low, high], axis=-1).reshape(*codes.shape[:-1], k * 3 // 32)


def unpack_codes(words: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Inverse of :func:`pack_codes`.

    Args:
      words: uint32 words ``[..., k * bits / 32]``.
      bits: bits per code.

    Returns:
      int32 codes ``[..., k]``.

    Raises:
      ValueError: bits that cannot be unpacked, or words that are not uint32.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r} cannot be unpacked; accepted: {PACKABLE_BITS}")
    if words.dtype != jnp.uint32:
        raise ValueError(f"packed codes must be uint32, got {words.dtype}")
    if bits != 3:
        return _unpack_fields(words, bits).astype(jnp.int32)
    if words.shape[-1] % 3:
        raise ValueError(f"3-bit packed axis length {words.shape[-1]} is not a multiple of 3")
    chunks = words.reshape(*words.shape[:-1], words.shape[-1] // 3, 3)
    low = _unpack_fields(chunks[..., :2], 2)  # [..., chunks, 32]
    high = _unpack_fields(chunks[..., 2:], 1)  # [..., chunks, 32]
    codes = low | (high << jnp.uint32(2))
    return codes.reshape(*words.shape[:-1], -1).astype(jnp.int32)
