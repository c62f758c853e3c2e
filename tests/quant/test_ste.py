"""Straight-through estimators: forward values and the reference (PyTorch) gradient rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.quant import clip_inclusive, round_ste
from tests.conftest import require_module


def test_round_ste_rounds_half_to_even_and_passes_the_gradient():
    x = jnp.asarray([-1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 1.51], jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_ste(x)), np.round(np.asarray(x)))  # numpy: half to even
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: jnp.sum(round_ste(v) * 3.0))(x)), 3.0)


def test_clip_inclusive_gradient_matches_torch_clamp_at_the_bounds():
    torch = require_module("torch")
    x = np.asarray([-2.0, -1.0, -0.5, 0.0, 1.0, 1.5], np.float32)  # -1 and 1 sit on the bounds
    got = jax.grad(lambda v: jnp.sum(clip_inclusive(v, -1.0, 1.0) * 2.0))(jnp.asarray(x))
    t = torch.tensor(x, requires_grad=True)
    (torch.clamp(t, -1.0, 1.0) * 2.0).sum().backward()
    np.testing.assert_array_equal(np.asarray(got), t.grad.numpy())  # [0, 2, 2, 2, 2, 0]
    np.testing.assert_array_equal(np.asarray(clip_inclusive(jnp.asarray(x), -1.0, 1.0)), np.clip(x, -1, 1))
    # jnp.clip differs exactly there: it is why the quantizer does not use it
    assert not np.array_equal(np.asarray(jax.grad(lambda v: jnp.sum(jnp.clip(v, -1.0, 1.0) * 2.0))(x)),
                              t.grad.numpy())
