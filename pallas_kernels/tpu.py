"""TPU kernels (Pallas Mosaic): ``x @ W^T`` and ``dy @ W`` on packed weights.

Mosaic runs a kernel's grid sequentially on a core, so the reduction is the last grid
axis ("arbitrary") with a float32 VMEM accumulator zeroed under ``pl.when`` at its first
step and written out at its last; the other axes are "parallel" (megacore split). Each
step DMAs a packed K x N weight tile (K-major: lanes are output columns, so unpacking
only moves data along sublanes), dequantizes it in VMEM/vregs and feeds the MXU.
On CPU these kernels run under the TPU interpreter (``pltpu.InterpretParams``), and
``jax.jit(...).trace(...).lower(lowering_platforms=("tpu",))`` runs the Mosaic lowering
without a TPU, which is how the tests check them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import dot_precision, split_refs, weight_specs
from pallas_kernels.dequant import dequant_tile
from pallas_kernels.layout import PreparedWeights
from pallas_kernels.tuning import BlockSizes


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _kernel(w: PreparedWeights, dims, prec):
    """Kernel body: ``acc += dot_general(lhs, tile, dims)``, reduction on grid axis 2."""

    def kernel(*refs):
        lhs_ref, plane_refs, s_ref, z_ref, o_ref = split_refs(refs, w, n_scratch=1)
        acc_ref = refs[-1]

        @pl.when(pl.program_id(2) == 0)
        def _init():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        tile = dequant_tile(
            [r[...] for r in plane_refs], s_ref[...], None if z_ref is None else z_ref[...],
            bits=w.bits, zero_point=w.zero_point,
        ).astype(lhs_ref.dtype)
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], tile, dims, precision=prec, preferred_element_type=jnp.float32
        )

        @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
        def _done():
            o_ref[...] = acc_ref[...]

    return kernel


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def matmul(x: jax.Array, w: PreparedWeights, blocks: BlockSizes, *, interpret: bool = False) -> jax.Array:
    """``x @ W^T`` in float32 (the forward kernel).

    Grid: (M, N, K blocks); K, the last axis, is reduced into a VMEM accumulator.

    Args:
      x: ``[M_pad, K_pad]`` with ``M_pad % block_m == 0`` (``K_pad == w.k_pad``).
      w: the prepared weights. blocks: the call's tiles.
      interpret: run in the TPU interpreter (``pltpu.InterpretParams()``, CPU).
    Returns:
      float32 ``[M_pad, N_pad]``.
    """
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    m = x.shape[0]
    kn = lambda i, j, kb: (kb, j)  # noqa: E731 - grid (m, n, k) -> weight block (k, n)
    return pl.pallas_call(
        _kernel(w, (((1,), (0,)), ((), ())), dot_precision(x.dtype)),
        out_shape=jax.ShapeDtypeStruct((m, w.n_pad), jnp.float32),
        grid=(m // bm, w.n_pad // bn, w.k_pad // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb))] + weight_specs(w, bk, bn, kn),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_PARAMS,
        interpret=_interpret(interpret),
        name="qmatmul_fwd_tpu",
    )(x, *w.operands())


def matmul_dx(dy: jax.Array, w: PreparedWeights, blocks: BlockSizes, *, interpret: bool = False) -> jax.Array:
    """``dy @ W`` in float32 (the input gradient; the backward kernel of :func:`matmul`).

    Grid: (M, K, N blocks); N, the last axis, is reduced into a VMEM accumulator.

    Args:
      dy: ``[M_pad, N_pad]`` with ``M_pad % block_m == 0`` (``N_pad == w.n_pad``).
      w: the prepared weights. blocks: the tiles of the forward call.
      interpret: run in the TPU interpreter (``pltpu.InterpretParams()``, CPU).
    Returns:
      float32 ``[M_pad, K_pad]``.
    """
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    m = dy.shape[0]
    kn = lambda i, kb, j: (kb, j)  # noqa: E731 - grid (m, k, n) -> weight block (k, n)
    return pl.pallas_call(
        _kernel(w, (((1,), (1,)), ((), ())), dot_precision(dy.dtype)),
        out_shape=jax.ShapeDtypeStruct((m, w.k_pad), jnp.float32),
        grid=(m // bm, w.k_pad // bk, w.n_pad // bn),
        in_specs=[pl.BlockSpec((bm, bn), lambda i, kb, j: (i, j))] + weight_specs(w, bk, bn, kn),
        out_specs=pl.BlockSpec((bm, bk), lambda i, kb, j: (i, kb)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=_PARAMS,
        interpret=_interpret(interpret),
        name="qmatmul_dx_tpu",
    )(dy, *w.operands())
