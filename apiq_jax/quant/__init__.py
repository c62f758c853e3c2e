"""Pure-functional quantizers: no Flax, no model knowledge; jit/vmap/grad-able."""

from apiq_jax.quant.blockwise import (
    BlockQuantized,
    DoubleQuantized,
    absmax_dequantize_int8,
    absmax_quantize_int8,
    blockwise_dequantize,
    blockwise_quantize,
    double_dequantize,
    double_quantize,
    zeropoint_dequantize_int8,
    zeropoint_quantize_int8,
)
from apiq_jax.quant.clip import ClipLogits, clip_shape, init_clip
from apiq_jax.quant.config import QuantConfig
from apiq_jax.quant.fake_linear import FakeQuantWeight, fake_quant_matmul
from apiq_jax.quant.groups import from_groups, num_groups, to_groups
from apiq_jax.quant.normalfloat import NF4_QLORA, nf_codebook
from apiq_jax.quant.packing import pack_codes, packed_words, unpack_codes
from apiq_jax.quant.ste import clip_inclusive, round_ste
from apiq_jax.quant.tensor import QuantizedTensor, bits_per_param, dequantize, from_codes, quantize
from apiq_jax.quant.uniform import GroupParams, fake_quantize, group_params

__all__ = [
    "BlockQuantized", "ClipLogits", "DoubleQuantized", "FakeQuantWeight", "GroupParams", "NF4_QLORA", "QuantConfig", "QuantizedTensor",
    "absmax_dequantize_int8", "absmax_quantize_int8", "bits_per_param", "blockwise_dequantize",
    "blockwise_quantize", "clip_inclusive", "clip_shape", "dequantize", "double_dequantize",
    "double_quantize", "fake_quant_matmul", "fake_quantize", "from_codes", "from_groups", "group_params", "init_clip", "nf_codebook",
    "num_groups", "pack_codes", "packed_words", "quantize", "round_ste", "to_groups", "unpack_codes",
    "zeropoint_dequantize_int8", "zeropoint_quantize_int8",
]
