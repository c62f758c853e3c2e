"""Block sizes of the low-bit matmul kernels: :class:`BlockSizes` and the tables they come from.

A call's tiles come from, in order: the ``block_sizes=`` argument of
:func:`pallas_kernels.qmatmul`; else :func:`block_sizes_for`, which looks the device kind
(``jax.devices()[0].device_kind``, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite") up in
``TUNED_BLOCK_SIZES[platform]`` and falls back to ``DEFAULT_BLOCK_SIZES[platform]``.
Each table entry has two variants: "small" (decode, ``M <= SMALL_M``) streams the weight
with a short M tile and long K tiles; "large" is a compute-oriented tile for prefill /
training. The backward (``dy @ W``) kernel of a call uses the same :class:`BlockSizes`
as its forward (the same weight tile, the same M tile).

Constraints (:class:`BlockSizes` checks them on construction, :meth:`BlockSizes.check`
the platform ones):
  * all sizes are powers of two (a Triton requirement);
  * ``block_k`` is a multiple of 32 (whole packed words) dividing ``K_MULTIPLE`` and
    ``block_n`` divides ``N_MULTIPLE``
    (:func:`pallas_kernels.layout.prepare_weights` pads K and N to those multiples);
  * GPU: ``block_m`` and ``block_n`` >= 16 (``tl.dot`` needs every dim >= 16);
  * TPU: ``block_m`` a multiple of 8 (sublanes), ``block_n`` = 128 and ``block_k`` a
    multiple of 128 (lanes) whose packed tile rows (``block_k * width / 32`` for each bit
    plane) are a multiple of 8; so 3-bit weights (a 1-bit plane) need ``block_k = 256``.
The default numbers are starting points (the usual Triton int4 GEMM tilings; Mosaic's
8 x 128 tiling); they were not tuned on hardware in the session that wrote them, and
``TUNED_BLOCK_SIZES`` has no measured entry yet: add one per device kind from
``benchmarks/kernels.py --block-sizes`` runs on that device.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.layout import K_MULTIPLE, N_MULTIPLE, PLANES

SMALL_M = 16
PLATFORMS = ("gpu", "tpu")
VARIANTS = ("small", "large")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel call (forward and backward); validated on construction.

    Attributes:
      block_m: rows of activations per tile (``x`` is zero-padded to a multiple).
      block_n: output columns per tile; a power of two dividing ``N_MULTIPLE`` (128).
      block_k: reduction depth per step; a multiple of 32 dividing ``K_MULTIPLE`` (256).
    Raises ValueError naming the value and what is accepted.

    >>> BlockSizes(16, 128, 256)
    BlockSizes(block_m=16, block_n=128, block_k=256)
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise ValueError(f"{name}={v!r} is not supported; accepted: a power of two (1, 2, 4, 8, ...)")
        if self.block_k % 32 or K_MULTIPLE % self.block_k:
            raise ValueError(
                f"block_k={self.block_k} is not supported; accepted: a multiple of 32 dividing "
                f"K_MULTIPLE={K_MULTIPLE} ({_divisors(K_MULTIPLE, 32)})"
            )
        if N_MULTIPLE % self.block_n:
            raise ValueError(
                f"block_n={self.block_n} is not supported; accepted: a power of two dividing "
                f"N_MULTIPLE={N_MULTIPLE} (at most {N_MULTIPLE})"
            )

    def check(self, platform: str, bits: int | None = None) -> BlockSizes:
        """Raise ValueError unless ``platform``'s kernel can use these tiles.

        Args:
          platform: "gpu" or "tpu".
          bits: the weights' code width, for the TPU constraint on packed tile rows
            (None: checked for the narrowest bit plane of any width).
        Returns:
          ``self``, for chaining.
        """
        _check_platform(platform)
        if platform == "gpu":
            for name in ("block_m", "block_n"):
                if getattr(self, name) < 16:
                    raise ValueError(
                        f"{name}={getattr(self, name)} is too small for the GPU kernel; accepted: >= 16 "
                        "(Triton's dot needs every dimension >= 16)"
                    )
            return self
        if self.block_m % 8:
            raise ValueError(f"block_m={self.block_m} is not supported on TPU; accepted: a multiple of 8 (sublanes)")
        if self.block_n != N_MULTIPLE:
            raise ValueError(f"block_n={self.block_n} is not supported on TPU; accepted: {N_MULTIPLE} (lanes)")
        if bits is not None and bits not in PLANES:
            raise ValueError(f"bits={bits!r} is not supported; accepted: {tuple(PLANES)}")
        planes = PLANES.values() if bits is None else [PLANES[bits]]
        width = min(w for p in planes for w, _ in p)
        rows = self.block_k * width // 32
        if self.block_k % 128 or rows % 8:
            raise ValueError(
                f"block_k={self.block_k} is not supported on TPU for bits={bits}; accepted: a multiple of 128 "
                f"whose packed tile rows (block_k * {width} / 32 = {rows}) are a multiple of 8"
            )
        return self


def _divisors(n: int, step: int) -> str:
    return ", ".join(str(d) for d in range(step, n + 1, step) if n % d == 0)


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not supported; accepted: {PLATFORMS}")


DEFAULT_BLOCK_SIZES: dict[str, dict[str, BlockSizes]] = {
    # Triton: tl.dot needs every dim >= 16; decode keeps M at the minimum 16.
    "gpu": {"small": BlockSizes(16, 128, 256), "large": BlockSizes(64, 128, 128)},
    # Mosaic TPU: M tiles are multiples of 8 sublanes, N/K tiles multiples of 128 lanes.
    "tpu": {"small": BlockSizes(16, 128, 256), "large": BlockSizes(128, 128, 256)},
}

# platform -> device kind (exactly as ``jax.devices()[0].device_kind``) -> variant -> tiles.
# No entry measured yet; e.g. ``TUNED_BLOCK_SIZES["gpu"]["NVIDIA H100 80GB HBM3"] =
# {"small": BlockSizes(...), "large": BlockSizes(...)}``.
TUNED_BLOCK_SIZES: dict[str, dict[str, dict[str, BlockSizes]]] = {"gpu": {}, "tpu": {}}

# Triton launch parameters of the GPU kernels (num_warps, num_stages).
TRITON_WARPS = 4
TRITON_STAGES = 3


def variant(m: int) -> str:
    """The table variant for ``m`` activation rows.

    Args:
      m: rows of activations (tokens) in the call.
    Returns:
      "small" (decode) for ``m <= SMALL_M``, else "large".
    """
    return "small" if m <= SMALL_M else "large"


def block_sizes_for(platform: str, m: int, device_kind: str | None = None) -> BlockSizes:
    """The default tiles of a call with ``m`` activation rows on ``platform``.

    Args:
      platform: "gpu" or "tpu" (the kernel, not necessarily the machine: interpret mode).
      m: rows of activations (selects the "small" or "large" variant).
      device_kind: the key of ``TUNED_BLOCK_SIZES[platform]``; None for
        ``jax.devices()[0].device_kind``. A kind without an entry gets the platform default.
    Returns:
      The :class:`BlockSizes` (on TPU, ``block_m`` is cut to 8 when ``m <= 8``).

    >>> block_sizes_for("gpu", 1, device_kind="an unknown device")
    BlockSizes(block_m=16, block_n=128, block_k=256)
    """
    _check_platform(platform)
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    table = TUNED_BLOCK_SIZES[platform].get(device_kind, DEFAULT_BLOCK_SIZES[platform])
    b = table[variant(m)]
    if platform == "tpu" and m <= 8 < b.block_m:
        b = dataclasses.replace(b, block_m=8)
    return b
