"""Checkpointer: save/restore by step, latest step, max_to_keep, and trees that carry metadata (Lora)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apiq_jax.checkpoint import Checkpointer
from apiq_jax.lora import Lora, LoraConfig


def _lora(value: float) -> Lora:
    factors = {"layers": [{"q_proj": {"a": jnp.full((4, 2), value), "b": jnp.arange(6.0).reshape(2, 3)}}]}
    return Lora(factors, LoraConfig(rank=2, alpha=4.0, targets=("q",)))


def test_save_restore_latest_and_max_to_keep(tmp_path):
    lora = _lora(1.5)
    state = {"lora": lora, "opt_state": optax.adam(1e-3).init(lora), "step": jnp.int32(3)}
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        assert ck.latest_step() is None
        for step in (1, 2, 3):
            ck.save(step, {**state, "step": jnp.int32(step)})
        assert ck.latest_step() == 3
        assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["2", "3"]
        template = {"lora": _lora(0.0), "opt_state": optax.adam(1e-3).init(_lora(0.0)), "step": jnp.int32(0)}
        back = ck.restore(3, template)
    # the restored LoRA is a Lora again, with its config (static metadata) from the template
    assert isinstance(back["lora"], Lora) and back["lora"].config == lora.config
    np.testing.assert_array_equal(np.asarray(back["lora"]["layers"][0]["q_proj"].a), 1.5)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves({**state, "step": jnp.int32(3)})):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_reopening_resumes_and_bad_arguments(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(5, {"x": jnp.ones(3)})
    with Checkpointer(tmp_path / "ck") as ck:  # a new process sees the same steps
        assert ck.latest_step() == 5
        np.testing.assert_array_equal(np.asarray(ck.restore(5, {"x": jnp.zeros(3)})["x"]), 1.0)
    with pytest.raises(ValueError, match="max_to_keep=0 must be >= 1"):
        Checkpointer(tmp_path / "other", max_to_keep=0)


def test_restore_failure_is_one_line():
    from apiq_jax.checkpoint import restore_failure

    err = ValueError("tensorstore: bad chunk at /x/0.0 See full error in the log\nsecond line\nthird")
    assert restore_failure(err) == "ValueError: tensorstore: bad chunk at /x/0.0"
    assert restore_failure(KeyError()) == "KeyError: KeyError"
    assert len(restore_failure(RuntimeError("x" * 1000))) == len("RuntimeError: ") + 300
