"""Low-bit (2/3/4-bit) packed-weight matmul kernels in Pallas.

Works on raw arrays and static ints (no dependency on ``apiq_jax``)::

    w = prepare_weights(codes, scales, zeros, bits=2, k=K, group_size=64, scheme="asym")
    y = qmatmul(x, w, platform="gpu")          # float32 [M, N]; jax.grad works wrt x

Modules: :mod:`~pallas_kernels.layout` (kernel layout of the packed weights),
:mod:`~pallas_kernels.dequant` (in-kernel tile dequantization),
:mod:`~pallas_kernels.gpu` (Triton kernels), :mod:`~pallas_kernels.tpu` (Mosaic kernels),
:mod:`~pallas_kernels.tuning` (block-size tables), :mod:`~pallas_kernels.ops`
(custom-VJP entry point).
"""

from pallas_kernels.dequant import dequantize_prepared
from pallas_kernels.layout import (
    KERNEL_BITS,
    PreparedWeights,
    check_layout,
    prepare_weights,
)
from pallas_kernels.ops import X_DTYPES, qmatmul
from pallas_kernels.tuning import BLOCKS, PLATFORMS, blocks_for

__all__ = [
    "BLOCKS", "KERNEL_BITS", "PLATFORMS", "PreparedWeights", "blocks_for", "check_layout", "dequantize_prepared",
    "X_DTYPES", "prepare_weights", "qmatmul",
]
