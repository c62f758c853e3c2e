"""pallas_kernels.layout: the kernel layout keeps the stored values; clear errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dequantize_prepared, prepare_weights
from pallas_kernels.layout import K_MULTIPLE, N_MULTIPLE, check_layout, padded_k
from tests.pallas_kernels.kernel_helpers import make


def test_prepare_weights_keeps_values_and_pads_with_zero_weights():
    qt, prep, w = make(3, "asym", 200, 172)
    assert prep.k_pad % K_MULTIPLE == 0 and prep.n_pad % N_MULTIPLE == 0
    assert prep.k_pad >= 172 and prep.n_pad >= 200 and prep.shape == (200, 172)
    assert [p.shape for p in prep.planes] == [(prep.k_pad // 16, prep.n_pad), (prep.k_pad // 32, prep.n_pad)]
    assert prep.scales.shape == (prep.k_pad // 64, 1, prep.n_pad)
    assert not np.any(np.asarray(prep.scales)[:, 0, 200:]) and not np.any(np.asarray(prep.scales)[3:])
    np.testing.assert_array_equal(np.asarray(dequantize_prepared(prep)), w)
    # the operand order the kernels rely on
    ops = prep.operands()
    assert ops[:2] == list(prep.planes) and ops[2] is prep.scales and ops[3] is prep.zeros


def test_sym_has_no_zero_operand():
    _, prep, _ = make(2, "sym", 64, 128)
    assert prep.zeros is None and prep.zero_point == 1 and len(prep.operands()) == 2


def test_padded_k():
    assert padded_k(172, 64) == 256 and padded_k(256, 32) == 256 and padded_k(300, 512) == 512


def test_errors_name_the_value_and_accepted_ones():
    qt, _, _ = make(2, "asym", 64, 128)
    args = dict(k=128, group_size=64, scheme="asym")
    with pytest.raises(ValueError, match=r"bits=8 .*accepted: \(2, 3, 4\)"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=8, k=128, group_size=64, scheme="asym")
    with pytest.raises(ValueError, match=r"scheme='nf'.*accepted"):
        prepare_weights(qt.codes, qt.scales, None, bits=2, k=128, group_size=64, scheme="nf")
    with pytest.raises(ValueError, match=r"group_size=96.*accepted: 32, 64, 128"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=2, k=128, group_size=96, scheme="asym")
    with pytest.raises(ValueError, match=r"8 words per row; 12 expected"):
        prepare_weights(qt.codes, qt.scales, qt.zeros, bits=3, **args)
    with pytest.raises(ValueError, match=r"zeros must be given"):
        prepare_weights(qt.codes, qt.scales, None, bits=2, **args)
    with pytest.raises(ValueError, match=r"codes must be uint32"):
        prepare_weights(qt.codes.astype(jnp.int32), qt.scales, qt.zeros, bits=2, **args)
    with pytest.raises(ValueError, match=r"scales have shape \(64, 1\); expected \(64, 2\)"):
        prepare_weights(qt.codes, qt.scales[:, :1], qt.zeros, bits=2, **args)
    check_layout(4, 512, "sym")  # a multiple of K_MULTIPLE is accepted
