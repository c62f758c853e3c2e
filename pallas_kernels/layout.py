"""Kernel layout of packed low-bit weights, prepared once from the storage layout.

Storage layout (``apiq_jax.quant.packing``): a weight ``[N, K]`` is uint32 words
``[N, K_pack * bits / 32]`` packed along K, LSB-first sequential fields for 2 and 4 bits;
for 3 bits, chunks of 32 codes in 3 words (two words of 2-bit low fields, one word of
high bits). Per-group constants ``[N, n_groups]`` run along K.

Kernel layout (:class:`PreparedWeights`), K-major so a tile's lanes are output columns:
  * ``planes``: one or two uint32 arrays ``[K_pad * width / 32, N_pad]``. A code is the
    OR of its fields in the planes, shifted by each plane's ``shift``: 2 and 4 bits use
    one plane of their own width; 3 bits use a 2-bit plane (the low fields, which in the
    storage layout already form a sequential 2-bit packing once the high words are
    removed) and a 1-bit plane shifted by 2. Inside a plane the packing is the storage
    one: word ``w`` field ``j`` is code ``k = w * (32 / width) + j``.
  * ``scales``: float32 ``[K_pad / group_size, 1, N_pad]`` and, for the "asym" scheme,
    ``zeros`` float32 of the same shape ("sym" uses the constant ``2^(bits-1) - 1``).
K is zero-padded to a multiple of ``K_MULTIPLE`` (and of the group size), N to a
multiple of ``N_MULTIPLE``; padded codes and scales are 0, so padded weights are 0.
The block sizes of :mod:`pallas_kernels.tuning` divide these multiples.
The transformation works on whole words: the dense weight is never formed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

K_MULTIPLE = 256  # K (and every group longer than 128) is padded to a multiple of this
N_MULTIPLE = 128  # N is padded to a multiple of this
KERNEL_BITS = (2, 3, 4)
PLANES: dict[int, tuple[tuple[int, int], ...]] = {  # bits -> ((width, shift), ...)
    2: ((2, 0),),
    3: ((2, 0), (1, 2)),
    4: ((4, 0),),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """Packed weight in kernel layout (see module docstring); a pytree with static shape data."""

    planes: tuple[jnp.ndarray, ...]
    scales: jnp.ndarray
    zeros: jnp.ndarray | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    zero_point: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``(N, K)`` of the weight, as the storage layout's ``shape``."""
        return (self.n, self.k)

    @property
    def k_pad(self) -> int:
        """K after padding (a multiple of ``K_MULTIPLE`` and of the group size)."""
        return self.scales.shape[0] * self.group_size

    @property
    def n_pad(self) -> int:
        """N after padding (a multiple of ``N_MULTIPLE``)."""
        return self.scales.shape[-1]

    def operands(self) -> list[jax.Array]:
        """The arrays in the order the kernels take them.

        Returns:
          The bit planes, the scales, then the zero points when the scheme has them.
        """
        return [*self.planes, self.scales] + ([] if self.zeros is None else [self.zeros])


def padded_k(k: int, group_size: int) -> int:
    """K after padding: a multiple of the group size and of ``K_MULTIPLE``.

    Args:
      k: the logical (or packed) input width.
      group_size: codes per group along K.
    Returns:
      The smallest multiple of ``lcm(group_size, K_MULTIPLE)`` that is ``>= k``.
    """
    return _round_up(k, math.lcm(group_size, K_MULTIPLE))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def check_layout(bits: int, group_size: int, scheme: str) -> None:
    """Raise ValueError unless the kernels can take this bit width / group size / scheme.

    Args:
      bits: code width (accepted: ``KERNEL_BITS``).
      group_size: codes per group along K (32, 64, 128 or a multiple of ``K_MULTIPLE``).
      scheme: "asym" or "sym".
    Returns:
      None.
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits!r} is not supported by the Pallas kernels; accepted: {KERNEL_BITS}")
    if scheme not in ("asym", "sym"):
        raise ValueError(
            f"scheme={scheme!r} is not supported by the Pallas kernels; accepted: ('asym', 'sym')"
        )
    if not isinstance(group_size, int) or not (
        group_size in (32, 64, 128) or (group_size > 0 and group_size % K_MULTIPLE == 0)
    ):
        raise ValueError(
            f"group_size={group_size!r} is not supported by the Pallas kernels; accepted: "
            f"32, 64, 128 or a positive multiple of {K_MULTIPLE} (so groups tile the K blocks)"
        )


def _pad2(a: jnp.ndarray, rows: int, cols: int) -> jnp.ndarray:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def prepare_weights(
    codes: jnp.ndarray,
    scales: jnp.ndarray,
    zeros: jnp.ndarray | None,
    *,
    bits: int,
    k: int,
    group_size: int,
    scheme: str,
) -> PreparedWeights:
    """Re-arrange storage-layout packed codes and constants into the kernel layout.

    Args:
      codes: uint32 ``[N, K_pack * bits / 32]`` (``K_pack >= k``, a multiple of 32).
      scales: ``[N, n_groups]`` float (any float dtype; kept as float32).
      zeros: ``[N, n_groups]`` zero points for "asym" (any numeric dtype), None for "sym".
      bits: 2, 3 or 4. k: the logical input width. group_size: codes per group along K.
      scheme: "asym" or "sym" (zero point ``2^(bits-1) - 1``).
    Returns:
      The :class:`PreparedWeights` (no copy of the storage-layout codes is kept).
    Raises ValueError for unsupported bits/scheme/group size and inconsistent shapes.
    """
    check_layout(bits, group_size, scheme)
    if codes.ndim != 2 or codes.dtype != jnp.uint32:
        raise ValueError(f"codes must be uint32 [N, words], got {codes.dtype} {codes.shape}")
    n = codes.shape[0]
    n_groups = -(-k // group_size)
    k_pack = _round_up(n_groups * group_size, 32)
    if codes.shape[1] * 32 != k_pack * bits:
        raise ValueError(
            f"codes have {codes.shape[1]} words per row; {k_pack * bits // 32} expected for "
            f"k={k}, group_size={group_size}, bits={bits}"
        )
    if scales.shape != (n, n_groups):
        raise ValueError(f"scales have shape {scales.shape}; expected {(n, n_groups)}")
    if (zeros is None) != (scheme == "sym"):
        raise ValueError(f"zeros must be given for scheme 'asym' and None for 'sym' (scheme={scheme!r})")
    if zeros is not None and zeros.shape != (n, n_groups):
        raise ValueError(f"zeros have shape {zeros.shape}; expected {(n, n_groups)}")
    k_pad = padded_k(k_pack, group_size)
    n_pad = _round_up(n, N_MULTIPLE)
    if bits == 3:
        chunks = codes.reshape(n, k_pack // 32, 3)
        words = (chunks[..., :2].reshape(n, -1), chunks[..., 2])
    else:
        words = (codes,)
    planes = tuple(
        _pad2(w, n_pad, k_pad * width // 32).T for w, (width, _) in zip(words, PLANES[bits])
    )

    def consts(a: jnp.ndarray) -> jnp.ndarray:
        return _pad2(a.astype(jnp.float32), n_pad, k_pad // group_size).T[:, None, :]

    return PreparedWeights(
        planes=planes,
        scales=consts(scales),
        zeros=None if zeros is None else consts(zeros),
        bits=bits,
        group_size=group_size,
        n=n,
        k=k,
        zero_point=2 ** (bits - 1) - 1 if scheme == "sym" else None,
    )
