"""The routing kernels of the rank-activation op (`@triton.jit`; launched by launchers.py).

`_route` applies a routing mode to one tile of H (or routes dH_g back); `_routing_kernel` runs it once
per token tile and sums split-K partials on the way; `_sum_slices_kernel` sums the weight gradients'
partials. No GEMM here: routing never sits inside a GEMM's K loop (DESIGN.md).
"""

import triton
import triton.language as tl

from .jit_tiles import _gate_tile, _load_sum


@triton.jit
def _route(
    src_ptr, stride_ss, n_split, stride_src, isrc_ptr, idst_ptr, g_ptr, stride_idx, stride_g,
    rows64, row_mask, ranks, mask, n_slots, n_blocks, block,
    ROUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Routed [BLOCK_M, BLOCK_R] tile of an [N, R] rank matrix (fp32; src may be split-K partials):

        dst[m, c] = sum_j g[m, j] * src[m, isrc[m, j]*block + c - idst[m, j]*block]   for c in blk(idst[m, j])

    Forward: src = H, isrc = iA, idst = iB gives the gated, B-aligned H_g. Backward: src = dH_g with
    the roles swapped gives dH. Slots with an index outside [0, E) (the -1 "no adapter") add nothing.
    """
    # One branch per constexpr mode and a single return: Triton compiles code after an early
    # return in a constexpr branch too, and it would not type-check with dense mode's dummy pointers.
    if ROUTE == 2:  # SEPARATE (iA != iB): gather block isrc of each row and move it onto the ranks of block idst
        res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(n_slots):
            i_src = tl.load(isrc_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            i_dst = tl.load(idst_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            g = tl.load(g_ptr + rows64 * stride_g + j, mask=row_mask, other=0.0).to(tl.float32)
            valid = (i_src >= 0) & (i_src < n_blocks) & (i_dst >= 0) & (i_dst < n_blocks)
            hit = ((ranks // block)[None, :] == i_dst[:, None]) & valid[:, None] & mask
            cols = ranks[None, :] + ((i_src - i_dst) * block)[:, None]
            res += g[:, None] * _load_sum(src_ptr, stride_ss, n_split, rows64[:, None] * stride_src + cols, hit)
    else:
        res = _load_sum(src_ptr, stride_ss, n_split, rows64[:, None] * stride_src + ranks[None, :], mask)
        if ROUTE != 3:  # DENSE or SAME: a per-rank gate on the contiguous tile (UNGATED: none)
            res = res * _gate_tile(isrc_ptr, g_ptr, stride_idx, stride_g, rows64, row_mask, ranks, mask, n_slots,
                                   n_blocks, block, ROUTE, BLOCK_M, BLOCK_R)
    return res


@triton.jit
def _routing_kernel(
    h_ptr, dhg_ptr, idx_a_ptr, idx_b_ptr, g_ptr, h_out_ptr, hg_ptr, dh_ptr, dg_ptr,
    N, R, n_slots, n_blocks, block, h_splits, dhg_splits,
    stride_hs, stride_h, stride_dhgs, stride_dhg, stride_idx, stride_g, stride_dg,
    ROUTE: tl.constexpr, STORE_H: tl.constexpr, STORE_HG: tl.constexpr, STORE_DH: tl.constexpr,
    STORE_DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per token tile, the routing and its backward, each computed once per token. H and dH_g may be split-K
    partial buffers ([S, N, R] fp32), summed here rather than in a launch of their own.
    Forward: H (summed, STORE_H, saved for backward) and H_g = route(H) (the expand's input).
    Backward: H_g (dB's input), dH = route^T(dH_g) (dX's, dA's) and dg[n, j] = <dH_g[blk iB], H[blk iA]>.
    Outputs are contiguous [N, R] (dg: [N, k] or [N, E]); stores cast to each output's dtype."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, BLOCK_S)
    dg = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = row_mask[:, None] & (ranks < R)[None, :]
        offs = rows64[:, None] * R + ranks[None, :]
        if STORE_H:
            h = _load_sum(h_ptr, stride_hs, h_splits, rows64[:, None] * stride_h + ranks[None, :], mask)
            tl.store(h_out_ptr + offs, h, mask=mask)
        if STORE_HG:
            hg = _route(h_ptr, stride_hs, h_splits, stride_h, idx_a_ptr, idx_b_ptr, g_ptr, stride_idx, stride_g,
                        rows64, row_mask, ranks, mask, n_slots, n_blocks, block, ROUTE, BLOCK_M, BLOCK_R)
            tl.store(hg_ptr + offs, hg.to(hg_ptr.dtype.element_ty), mask=mask)
        if STORE_DH:
            dh = _route(dhg_ptr, stride_dhgs, dhg_splits, stride_dhg, idx_b_ptr, idx_a_ptr, g_ptr, stride_idx,
                        stride_g, rows64, row_mask, ranks, mask, n_slots, n_blocks, block, ROUTE, BLOCK_M, BLOCK_R)
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        if STORE_DG and (ROUTE == 1 or ROUTE == 2):
            # Partial <dH_g, H> of each slot over this rank chunk, on the A-side ranks.
            h = _load_sum(h_ptr, stride_hs, h_splits, rows64[:, None] * stride_h + ranks[None, :], mask)
            for j in range(n_slots):
                ia = tl.load(idx_a_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
                ib = tl.load(idx_b_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
                valid = (ia >= 0) & (ia < n_blocks) & (ib >= 0) & (ib < n_blocks)
                hit = ((ranks // block)[None, :] == ia[:, None]) & valid[:, None] & mask
                cols = ranks[None, :] + ((ib - ia) * block)[:, None]
                v = _load_sum(dhg_ptr, stride_dhgs, dhg_splits, rows64[:, None] * stride_dhg + cols, hit)
                part = tl.sum(v * h, axis=1)
                dg += tl.where(slots[None, :] == j, part[:, None], 0.0)
    if STORE_DG:
        if ROUTE == 0:
            # Dense: dg[n, e] = sum_t dH_g[n, e*b+t] * H[n, e*b+t], a strided walk over the block.
            for e0 in range(0, n_blocks, BLOCK_S):
                es = (e0 + slots).to(tl.int64)
                emask = row_mask[:, None] & (es < n_blocks)[None, :]
                acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
                for t in range(block):
                    c = (es * block + t)[None, :]
                    acc += (_load_sum(dhg_ptr, stride_dhgs, dhg_splits, rows64[:, None] * stride_dhg + c, emask)
                            * _load_sum(h_ptr, stride_hs, h_splits, rows64[:, None] * stride_h + c, emask))
                tl.store(dg_ptr + rows64[:, None] * stride_dg + es[None, :], acc.to(dg_ptr.dtype.element_ty),
                         mask=emask)
        else:
            smask = row_mask[:, None] & (slots < n_slots)[None, :]
            tl.store(dg_ptr + rows64[:, None] * stride_dg + slots[None, :], dg.to(dg_ptr.dtype.element_ty),
                     mask=smask)


@triton.jit
def _sum_slices_kernel(src1, dst1, numel1, splits1, src2, dst2, numel2, splits2, BLOCK: tl.constexpr):
    """dst = the sum of the slices of an fp32 [S, numel] split-K partial buffer, cast to dst's dtype, for two
    buffers in one launch (the weight gradients dA and dB): programs [0, cdiv(numel1, BLOCK)) sum the
    first, the rest the second."""
    pid = tl.program_id(0)
    first = tl.cdiv(numel1, BLOCK)
    if pid < first:
        offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        mask = offs < numel1
        tl.store(dst1 + offs, _load_sum(src1, numel1, splits1, offs, mask).to(dst1.dtype.element_ty), mask=mask)
    else:
        offs = ((pid - first) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        mask = offs < numel2
        tl.store(dst2 + offs, _load_sum(src2, numel2, splits2, offs, mask).to(dst2.dtype.element_ty), mask=mask)

