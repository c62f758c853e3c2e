"""pallas_kernels.common: the K block -> constant rows mapping and the operand plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import prepare_weights
from pallas_kernels.common import dot_precision, group_block, group_rows, split_refs, weight_specs


def _prepared(bits: int, scheme: str, n: int = 128, k: int = 256, gs: int = 64):
    codes = jnp.zeros((n, k * bits // 32), jnp.uint32)
    consts = jnp.ones((n, k // gs), jnp.float32)
    return prepare_weights(codes, consts, consts if scheme == "asym" else None, bits=bits, k=k, group_size=gs,
                           scheme=scheme)


@pytest.mark.parametrize("bk,gs", [(256, 32), (128, 128), (64, 256), (32, 512)])
def test_group_rows_and_block_cover_each_k_block(bk, gs):
    k_pad = 1024
    for kb in range(k_pad // bk):
        rows, block = group_rows(bk, gs), group_block(kb, bk, gs)
        groups = range(block * rows, block * rows + rows)
        # every code of the K block belongs to exactly the listed groups
        assert sorted({c // gs for c in range(kb * bk, (kb + 1) * bk)}) == list(groups)


def test_split_refs_and_specs_follow_the_operand_order():
    prep = _prepared(3, "asym")  # two planes, scales, zeros
    refs = ["x", *"pqsz", "out", "acc"]
    assert split_refs(refs, prep, n_scratch=1) == ("x", ["p", "q"], "s", "z", "out")
    specs = weight_specs(prep, 128, 128, lambda i, kb: (kb, 0))
    assert [s.block_shape for s in specs] == [(8, 128), (4, 128), (2, 1, 128), (2, 1, 128)]  # group 64
    sym = _prepared(2, "sym")
    assert split_refs(["x", "p", "s", "out"], sym) == ("x", ["p"], "s", None, "out")
    assert dot_precision("float32") == jax.lax.Precision.HIGHEST and dot_precision("bfloat16") is None
