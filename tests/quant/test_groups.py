"""Quantization groups along the last axis: counting, edge padding, and the way back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.quant import from_groups, num_groups, to_groups


@pytest.mark.parametrize("k,gs,expected", [(128, 64, 2), (172, 64, 3), (64, 64, 1), (5, 64, 1)])
def test_num_groups_rounds_up(k, gs, expected):
    assert num_groups(k, gs) == expected


def test_to_groups_pads_by_repeating_the_last_value_and_from_groups_drops_it():
    w = np.arange(2 * 5, dtype=np.float32).reshape(2, 5)
    g = np.asarray(to_groups(jnp.asarray(w), 4))
    assert g.shape == (2, 2, 4)
    want = np.concatenate([w, np.repeat(w[:, -1:], 3, axis=1)], axis=1).reshape(2, 2, 4)  # numpy edge padding
    np.testing.assert_array_equal(g, want)
    np.testing.assert_array_equal(np.asarray(from_groups(jnp.asarray(g), 5)), w)
    # padding never changes a group's min/max (what the quantizer's scales are made of)
    assert g[:, 1].max() == w[:, 4:].max() and g[:, 1].min() == w[:, 4:].min()
