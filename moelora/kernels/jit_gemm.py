"""The GEMM kernels of the rank-activation op (`@triton.jit`; launched by launchers.py).

`_matmul_kernel` is every plain GEMM (shrink, expand, the weight and input gradients), with split-K slices
and the epilogues that spare a launch (ADD: the base output; GATE: elementwise routing of the shrink).
`_grad_hg_kernel` is dH_g = s dY B with the routing's backward in its epilogue.
"""

import triton
import triton.language as tl

from .jit_tiles import _gate_tile, _tile_matmul


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, add_ptr, hg_ptr, idx_ptr, g_ptr,
    M, N, K, k_per_split, alpha, n_slots, n_blocks, block,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn, stride_add, stride_idx, stride_g,
    ADD: tl.constexpr, GATE: tl.constexpr, ROUTE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[s] = alpha * A[:, Ks] @ B[Ks, :] (+ ADD[:, :]) for the s-th slice Ks of K (program axis 2), fp32
    accumulate.

    Strides make transposes free (dA = dH^T x reads dH column-major). With one slice, C is the result;
    with several, C is an fp32 [S, M, N] partial buffer its consumer sums (deterministic split-K). ADD
    (one slice only) adds a row-major [M, N] input in the epilogue (vLLM's ADD_INPUTS): the expand adds the
    base output there, so y is read and written exactly once. GATE (one slice, the shrink H = x A^T)
    also stores H_g = H * gate in the epilogue (ROUTE: DENSE or SAME), so no routing kernel runs.
    """
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = _tile_matmul(a_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, k_lo, k_hi, stride_am, stride_ak, stride_bk,
                       stride_bn, COMPUTE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = acc * alpha
    mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(add_ptr + offs_m[:, None] * stride_add + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    offs_c = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptr + offs_c + pid_s * stride_cs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if GATE:
        gate = _gate_tile(idx_ptr, g_ptr, stride_idx, stride_g, offs_m, m_mask, offs_n, mask, n_slots, n_blocks,
                          block, ROUTE, BLOCK_M, BLOCK_N)
        tl.store(hg_ptr + offs_c, acc * gate, mask=mask)


@triton.jit
def _grad_hg_kernel(
    dy_ptr, b_ptr, h_ptr, idx_ptr, g_ptr, hg_ptr, dh_ptr, dg_ptr,
    M, N, K, alpha, n_slots, n_blocks, block,
    stride_dym, stride_dyk, stride_bk, stride_bn, stride_h, stride_idx, stride_g, stride_dg,
    ROUTE: tl.constexpr, STORE_HG: tl.constexpr, STORE_DH: tl.constexpr, STORE_DG: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dH_g = alpha * dY @ B for a [BLOCK_M tokens, BLOCK_N ranks] tile (unsplit), and the routing's backward
    in the epilogue, where routing is elementwise (ROUTE: DENSE or SAME) and every block lies inside one rank
    tile (block divides BLOCK_N): H_g = H * gate (dB's input), dH = dH_g * gate, and dg = <dH_g, H> over each
    block, stored by the tile that holds the block (a slot with no valid block: zero, by rank tile 0).
    Outputs are contiguous [M, N] (dg: [M, k] or [M, E]); no routing kernel runs."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = _tile_matmul(dy_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, 0, K, stride_dym, stride_dyk, stride_bk,
                       stride_bn, COMPUTE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = acc * alpha
    mask = m_mask[:, None] & n_mask[None, :]
    gate = _gate_tile(idx_ptr, g_ptr, stride_idx, stride_g, offs_m, m_mask, offs_n, mask, n_slots, n_blocks, block,
                      ROUTE, BLOCK_M, BLOCK_N)
    offs = offs_m[:, None] * N + offs_n[None, :]
    if STORE_DH:
        tl.store(dh_ptr + offs, (acc * gate).to(dh_ptr.dtype.element_ty), mask=mask)
    h = tl.load(h_ptr + offs_m[:, None] * stride_h + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_HG:
        tl.store(hg_ptr + offs, h * gate, mask=mask)
    if STORE_DG:
        prod = acc * h
        tile_lo = pid_n * BLOCK_N  # this tile's first rank; blocks never straddle tiles here
        blk = offs_n // block
        if ROUTE == 0:  # DENSE: dg[n, e] for the blocks of this tile
            for e in range(tile_lo // block, tl.minimum((tile_lo + BLOCK_N) // block, n_blocks)):
                part = tl.sum(tl.where((blk == e)[None, :], prod, 0.0), axis=1)
                tl.store(dg_ptr + offs_m * stride_dg + e, part.to(dg_ptr.dtype.element_ty), mask=m_mask)
        else:  # SAME: the tile holding slot j's block stores dg[n, j]
            for j in range(n_slots):
                i = tl.load(idx_ptr + offs_m * stride_idx + j, mask=m_mask, other=-1)
                part = tl.sum(tl.where(blk[None, :] == i[:, None], prod, 0.0), axis=1)
                invalid = (i < 0) | (i >= n_blocks)
                mine = (i * block >= tile_lo) & (i * block < tile_lo + BLOCK_N) & (i < n_blocks)
                owner = mine | (invalid & (tl.zeros_like(i) + pid_n == 0))
                tl.store(dg_ptr + offs_m * stride_dg + j, part.to(dg_ptr.dtype.element_ty), mask=m_mask & owner)

