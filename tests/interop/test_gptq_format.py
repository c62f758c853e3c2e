"""apiq_jax/interop/gptq_format.py against the published GPTQ bit layout, read by an independent
float64 numpy decoder written here (bit strings, not shifts), and the format's error cases."""

from __future__ import annotations

import numpy as np
import pytest

from apiq_jax.interop.gptq_format import from_gptq, pack_rows, to_gptq, unpack_rows
from apiq_jax.quant import QuantConfig, dequantize, quantize


def reference_unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Packed int32 ``[W, C]`` -> values ``[W*32/bits, C]``: the column's words, little-endian bit by bit,
    read as one bit string in which value j holds bits ``[bits*j, bits*j + bits)`` (AutoGPTQ's layout,
    3-bit values straddling words included)."""
    w = np.ascontiguousarray(np.asarray(words).astype("<i4").T)  # [C, W]
    stream = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")  # [C, W*32], bit i of word k at 32k+i
    n = stream.shape[1] // bits
    fields = stream[:, : n * bits].reshape(w.shape[0], n, bits).astype(np.int64)
    return (fields * (2 ** np.arange(bits))).sum(-1).T  # [n, C]


def reference_dequantize(t: dict[str, np.ndarray], bits: int, v1: bool) -> np.ndarray:
    """``[out, in]`` float64 weight of GPTQ tensors: ``(q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``."""
    q = reference_unpack(t["qweight"], bits)  # [K, N]
    zeros = reference_unpack(t["qzeros"].T, bits).T + (1 if v1 else 0)  # packed along N: [G, N]
    g = t["g_idx"]
    w = (q - zeros[g]) * t["scales"].astype(np.float64)[g]
    return w.T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_is_the_published_bit_stream(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, (96, 5))
    words = pack_rows(values, bits)
    assert words.dtype == np.int32 and words.shape == (96 * bits // 32, 5)
    np.testing.assert_array_equal(reference_unpack(words, bits), values)
    np.testing.assert_array_equal(unpack_rows(words, bits), values)
    if bits == 3:  # AutoGPTQ: value 10 of a chunk has its low 2 bits at 30-31 of word 0, its high bit at bit 0 of word 1
        one = np.zeros((32, 1), np.int64)
        one[10] = 0b101
        w = pack_rows(one, 3).view(np.uint32)[:, 0]
        assert w[0] == 0b01 << 30 and w[1] == 1 and w[2] == 0


@pytest.mark.parametrize("bits, scheme, fmt", [(2, "asym", "gptq"), (3, "sym", "gptq"), (4, "asym", "gptq_v2"),
                                               (8, "sym", "gptq_v2")])
def test_to_gptq_decodes_to_the_same_weight_and_back(bits, scheme, fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32) * 0.05
    qt = quantize(w, QuantConfig(bits=bits, group_size=32, scheme=scheme))
    t = to_gptq(qt, "layers.0.q_proj", fmt)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].dtype == np.float16 and t["g_idx"].tolist() == [k // 32 for k in range(128)]
    # float64 decode of the written bits equals apiq-jax's dequantized weight exactly (fp16 scale times a small int)
    np.testing.assert_array_equal(reference_dequantize(t, bits, fmt == "gptq"), np.asarray(dequantize(qt), np.float64))
    back = from_gptq(t, bits, 32, fmt, "x", scheme=scheme)
    for a, b in zip((qt.codes, qt.scales, qt.zeros), (back.codes, back.scales, back.zeros)):
        assert (a is None and b is None) or (np.asarray(a).dtype == np.asarray(b).dtype
                                             and np.array_equal(np.asarray(a), np.asarray(b)))
    assert back.config == qt.config


def test_zero_point_ranges_are_named():
    w = np.abs(np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)) + 0.1  # all-positive groups
    w[:, 1::2] = np.linspace(0.0, 0.01, 32)[:, None]  # a small minimum: zero point 0 in some groups
    qt = quantize(w, QuantConfig(bits=2, group_size=32))
    zeros = np.asarray(qt.zeros)
    assert (zeros == 0).any()
    with pytest.raises(ValueError, match=r"layers\.1\.v_proj: group \d+ of row \d+ has zero point 0, outside .*"
                                         r"\[1, 4\].*gptq_v2"):
        to_gptq(qt, "layers.1.v_proj", "gptq")
    t = to_gptq(qt, "layers.1.v_proj", "gptq_v2")  # v2 stores zero 0
    np.testing.assert_array_equal(reference_dequantize(t, 2, False), np.asarray(dequantize(qt), np.float64))
    neg = quantize(w + 1.0, QuantConfig(bits=2, group_size=32))  # min far above 0: negative zero points
    assert (np.asarray(neg.zeros) < 0).any()
    with pytest.raises(ValueError, match=r"has zero point -\d+, outside the range \[0, 3\]"):
        to_gptq(neg, "x", "gptq_v2")


def test_incompatible_tensors_are_named():
    w = np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32)
    with pytest.raises(ValueError, match="layers.0.down_proj: shape .*in=96.* group size 64"):
        to_gptq(quantize(w, QuantConfig(bits=2, group_size=64)), "layers.0.down_proj")
    with pytest.raises(ValueError, match="scales are bfloat16; GPTQ stores float16"):
        to_gptq(quantize(w, QuantConfig(bits=2, group_size=32, scale_dtype="bfloat16")), "x")
    with pytest.raises(ValueError, match="scheme 'nf'"):
        to_gptq(quantize(w, QuantConfig(bits=4, group_size=32, scheme="nf")), "x")


def test_act_order_and_bad_shapes_are_refused_on_read():
    w = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
    t = to_gptq(quantize(w, QuantConfig(bits=4, group_size=32)), "x")
    shuffled = dict(t, g_idx=np.random.default_rng(0).permutation(t["g_idx"]))
    with pytest.raises(ValueError, match="q_proj: g_idx is not in group order .*act-order"):
        from_gptq(shuffled, 4, 32, "gptq", "q_proj")
    with pytest.raises(ValueError, match="scales are \\(4, 64\\); expected \\(2, 64\\) for group size 64"):
        from_gptq(t, 4, 64, "gptq", "q_proj")
    with pytest.raises(ValueError, match="missing GPTQ tensors \\['qzeros'\\]"):
        from_gptq({k: v for k, v in t.items() if k != "qzeros"}, 4, 32, "gptq", "q_proj")
