"""GPU kernels (Pallas, Triton lowering): ``x @ W^T`` and ``dy @ W`` on packed weights.

Lowering choice. jax 0.10.2 offers two Pallas GPU back ends: ``pallas.triton`` (the
generic Pallas API: ``pallas_call`` + ``BlockSpec`` + grid, lowered to Triton IR) and
``pallas.mosaic_gpu`` (warp-group level, Hopper/Blackwell only, its own memory-space /
barrier API and no generic-interpret path). The kernels here use the generic API, so the
same code runs under ``interpret=True`` on CPU (how the tests check it) and lowers through
Triton on any CUDA GPU; a Mosaic-GPU (wgmma) version would be the next step for H100
peak throughput. They were not run on a GPU in the session that wrote them.

Structure: Triton runs grid programs in parallel, so the reduction is a ``fori_loop``
inside one program (grid = output tiles) rather than a grid axis. Each step loads a
packed K x N weight tile (K-major: lanes are output columns), dequantizes it in
registers (:func:`pallas_kernels.dequant.dequant_tile`) and feeds ``dot`` with float32
accumulation; the dense weight never exists in HBM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import dot_precision, group_block, group_rows, split_refs, weight_specs
from pallas_kernels.dequant import dequant_tile
from pallas_kernels.layout import PLANES, PreparedWeights
from pallas_kernels.tuning import TRITON_STAGES, TRITON_WARPS, BlockSizes

# Explicit Triton params select the Triton lowering (jax 0.10 defaults to Mosaic GPU).
_TRITON = pltriton.CompilerParams(num_warps=TRITON_WARPS, num_stages=TRITON_STAGES)


def _tile(w: PreparedWeights, plane_refs, s_ref, z_ref, kb, bk: int, cols) -> jax.Array:
    """Dequantized float32 tile ``[bk, len(cols)]`` of K block ``kb`` from full-K refs."""
    planes = [
        r[pl.ds(kb * (bk * width // 32), bk * width // 32), cols]
        for r, (width, _) in zip(plane_refs, PLANES[w.bits])
    ]
    n_rows = group_rows(bk, w.group_size)
    rows = pl.ds(group_block(kb, bk, w.group_size) * n_rows, n_rows)
    zeros = None if z_ref is None else z_ref[rows, :, cols]
    return dequant_tile(planes, s_ref[rows, :, cols], zeros, bits=w.bits, zero_point=w.zero_point)


def matmul(x: jax.Array, w: PreparedWeights, blocks: BlockSizes, *, interpret: bool = False) -> jax.Array:
    """``x @ W^T`` in float32 (the forward kernel).

    Grid: (M blocks, N blocks); K is reduced by a loop inside each program.

    Args:
      x: ``[M_pad, K_pad]`` with ``M_pad % block_m == 0`` (``K_pad == w.k_pad``).
      w: the prepared weights. blocks: the call's tiles.
      interpret: run in Pallas' generic interpreter (CPU).
    Returns:
      float32 ``[M_pad, N_pad]``.
    """
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    m, kp = x.shape
    prec = dot_precision(x.dtype)

    def kernel(*refs):
        x_ref, plane_refs, s_ref, z_ref, o_ref = split_refs(refs, w)
        cols = slice(None)

        def body(kb, acc):
            tile = _tile(w, plane_refs, s_ref, z_ref, kb, bk, cols).astype(x_ref.dtype)
            xk = x_ref[:, pl.ds(kb * bk, bk)]
            return acc + jnp.dot(xk, tile, precision=prec, preferred_element_type=jnp.float32)

        o_ref[...] = jax.lax.fori_loop(0, kp // bk, body, jnp.zeros((bm, bn), jnp.float32))

    g = w.scales.shape[0]
    const_spec = pl.BlockSpec((g, 1, bn), lambda i, j: (0, 0, j))
    in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0))]
    in_specs += [pl.BlockSpec((p.shape[0], bn), lambda i, j: (0, j)) for p in w.planes]
    in_specs += [const_spec] * (1 if w.zeros is None else 2)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, w.n_pad), jnp.float32),
        grid=(m // bm, w.n_pad // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_TRITON,
        name="qmatmul_fwd_gpu",
    )(x, *w.operands())


def matmul_dx(dy: jax.Array, w: PreparedWeights, blocks: BlockSizes, *, interpret: bool = False) -> jax.Array:
    """``dy @ W`` in float32 (the input gradient; the backward kernel of :func:`matmul`).

    Grid: (M blocks, K blocks); N is reduced by a loop inside each program.

    Args:
      dy: ``[M_pad, N_pad]`` with ``M_pad % block_m == 0`` (``N_pad == w.n_pad``).
      w: the prepared weights. blocks: the tiles of the forward call.
      interpret: run in Pallas' generic interpreter (CPU).
    Returns:
      float32 ``[M_pad, K_pad]``.
    """
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    m, np_ = dy.shape
    prec = dot_precision(dy.dtype)
    dims = (((1,), (1,)), ((), ()))

    def kernel(*refs):
        dy_ref, plane_refs, s_ref, z_ref, o_ref = split_refs(refs, w)

        def body(nb, acc):
            cols = pl.ds(nb * bn, bn)
            # The refs hold this program's K block only, so the tile is K block 0 of them.
            tile = _tile(w, plane_refs, s_ref, z_ref, 0, bk, cols).astype(dy_ref.dtype)
            d = dy_ref[:, cols]
            return acc + jax.lax.dot_general(d, tile, dims, precision=prec, preferred_element_type=jnp.float32)

        o_ref[...] = jax.lax.fori_loop(0, np_ // bn, body, jnp.zeros((bm, bk), jnp.float32))

    in_specs = [pl.BlockSpec((bm, np_), lambda i, kb: (i, 0))] + weight_specs(w, bk, np_, lambda i, kb: (kb, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, w.k_pad), jnp.float32),
        grid=(m // bm, w.k_pad // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, kb: (i, kb)),
        interpret=interpret,
        compiler_params=_TRITON,
        name="qmatmul_dx_gpu",
    )(dy, *w.operands())
