"""CPU kernels as XLA FFI custom calls (C++ built on first use): fused causal attention.

Pallas has no CPU lowering, so where XLA's CPU code for an operation is the bottleneck the
kernel is C++ behind :func:`jax.ffi.ffi_call` (:mod:`~apiq_jax.cpu_kernels.attention`),
compiled and cached by :mod:`~apiq_jax.cpu_kernels.build`.
"""

from apiq_jax.cpu_kernels.attention import attention_reference, fused_attention, supports, unavailable_reason
from apiq_jax.cpu_kernels.build import BuildError, cache_dir

__all__ = ["BuildError", "attention_reference", "cache_dir", "fused_attention", "supports", "unavailable_reason"]
