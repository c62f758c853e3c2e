"""Block sizes of the low-bit matmul kernels: one table per backend.

``BLOCKS[platform][variant]`` gives the ``(block_m, block_n, block_k)`` of the forward
kernel; the backward (``dy @ W``) kernel reuses the same tile of the weight. The
"small" variant (decode, ``M <= SMALL_M``) streams the weight with a short M tile and
long K tiles; the "large" variant is a compute-oriented tile for prefill / training.

Invariants the layout relies on (checked by ``tests/pallas_kernels``):
  * every ``block_k`` divides ``K_MULTIPLE`` and every ``block_n`` divides ``N_MULTIPLE``
    (:func:`pallas_kernels.layout.prepare_weights` pads K and N to those multiples);
  * every ``block_k`` is a multiple of 32 (whole packed words) and all sizes are powers
    of two (a Triton requirement).
GPU numbers are starting points from the usual Triton int4 GEMM tilings; they were not
tuned on hardware in the session that wrote them (no GPU was available).
"""

from __future__ import annotations

from typing import NamedTuple


class Blocks(NamedTuple):
    """Tile sizes of one kernel variant."""

    block_m: int
    block_n: int
    block_k: int


SMALL_M = 16
K_MULTIPLE = 256
N_MULTIPLE = 128
PLATFORMS = ("gpu", "tpu")

BLOCKS: dict[str, dict[str, Blocks]] = {
    # Triton: tl.dot needs every dim >= 16; decode keeps M at the minimum 16.
    "gpu": {"small": Blocks(16, 128, 256), "large": Blocks(64, 128, 128)},
    # Mosaic TPU: M tiles are multiples of 8 sublanes, N/K tiles multiples of 128 lanes.
    "tpu": {"small": Blocks(16, 128, 256), "large": Blocks(128, 128, 256)},
}

# Triton launch parameters of the GPU kernels (num_warps, num_stages).
TRITON_WARPS = 4
TRITON_STAGES = 3


def variant(m: int) -> str:
    """"small" (decode) for ``m <= SMALL_M`` rows of activations, else "large"."""
    return "small" if m <= SMALL_M else "large"


def blocks_for(platform: str, m: int) -> Blocks:
    """The block sizes used for ``m`` activation rows on ``platform`` ("gpu" or "tpu")."""
    if platform not in BLOCKS:
        raise ValueError(f"platform={platform!r} has no block table; accepted: {PLATFORMS}")
    b = BLOCKS[platform][variant(m)]
    if platform == "tpu" and m <= 8 < b.block_m:
        b = b._replace(block_m=8)
    return b
