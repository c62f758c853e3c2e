"""Low-bit (2/3/4-bit) packed-weight matmul kernels in Pallas."""
