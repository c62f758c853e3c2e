"""Low-bit (2/3/4-bit) packed-weight matmul kernels in Pallas.

Works on raw arrays and static ints (no dependency on ``apiq_jax``)::

    w = prepare_weights(codes, scales, zeros, bits=2, k=K, group_size=64, scheme="asym")
    y = qmatmul(x, w, platform="gpu")          # float32 [M, N]; jax.grad works wrt x
    y = qmatmul(x, w, platform="gpu", block_sizes=BlockSizes(16, 128, 256))  # per-call tiles
    y_ref = qmatmul_reference(x, w)            # pure jnp: dequantize + float32 dot

Modules: :mod:`~pallas_kernels.layout` (kernel layout of the packed weights),
:mod:`~pallas_kernels.dequant` (tile dequantization and its whole-weight reference),
:mod:`~pallas_kernels.common` (block specs shared by the kernels),
:mod:`~pallas_kernels.gpu` (Triton kernels), :mod:`~pallas_kernels.tpu` (Mosaic kernels),
:mod:`~pallas_kernels.tuning` (:class:`BlockSizes`, tables keyed by device kind),
:mod:`~pallas_kernels.ops` (custom-VJP entry point and its reference).
"""

from pallas_kernels.dequant import dequantize_prepared
from pallas_kernels.layout import (
    K_MULTIPLE,
    KERNEL_BITS,
    N_MULTIPLE,
    PreparedWeights,
    check_layout,
    prepare_weights,
)
from pallas_kernels.ops import X_DTYPES, qmatmul, qmatmul_reference
from pallas_kernels.tuning import (
    DEFAULT_BLOCK_SIZES,
    PLATFORMS,
    TUNED_BLOCK_SIZES,
    BlockSizes,
    block_sizes_for,
)

__all__ = [
    "DEFAULT_BLOCK_SIZES", "KERNEL_BITS", "K_MULTIPLE", "N_MULTIPLE", "PLATFORMS", "TUNED_BLOCK_SIZES",
    "X_DTYPES", "BlockSizes", "PreparedWeights", "block_sizes_for", "check_layout", "dequantize_prepared",
    "prepare_weights", "qmatmul", "qmatmul_reference",
]
