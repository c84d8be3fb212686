"""Triton kernels for `moelora.ops.rank_activation` (forward and backward). Design: kernels/DESIGN.md.

    y[n] = out[n] + s * sum_j g[n, j] * B[:, blk(iB[n, j])] @ (A[blk(iA[n, j]), :] @ x[n])

Layers, as in ScatterMoE: `@triton.jit` kernels -> thin launchers -> two PyTorch operators
(`torch.ops.moelora.rank_activation_fwd` / `_bwd`, registered with torch.library, the backward through
`register_autograd`) -> `rank_activation_triton` (same signature as the torch path). Being operators,
they are captured whole by torch.compile(fullgraph=True) and CUDA graphs: on a GPU they are `triton_op`s,
so Inductor sees the kernels and launches them itself; under the interpreter they are opaque `custom_op`s
whose fake implementation is the same code with the launches skipped.

Every routing pattern runs as "dense shrink -> route -> dense expand" over all R = E*block ranks:
at the ranks these methods use the branch is memory-bound, so skipping inactive ranks saves FLOPs
that do not bind (DESIGN.md). Where routing is elementwise on H (dense gates, shared selections, plain
LoRA) it runs in the shrink GEMM's epilogue; otherwise (MixLoRA's separate selections, or a split shrink)
once per token in a routing kernel that also sums the split-K partials. Nothing uses atomics: long
reductions are split into fp32 partials summed in a fixed order, so results are bitwise reproducible.

CPU: set TRITON_INTERPRET=1 *before* importing this module (Triton reads it at decoration time).
"""

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["rank_activation_triton", "Tiles", "tiles_for", "INTERPRET", "DENSE", "SAME", "SEPARATE", "UNGATED"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Routing modes (a constexpr in the kernels). UNGATED is plain LoRA (no gates: H_g = H).
DENSE, SAME, SEPARATE, UNGATED = 0, 1, 2, 3
# tl.dot operand dtypes, as constexpr codes (plain ints travel through torch.compile's kernel capture).
_F32, _F16, _BF16 = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _to_compute(x, COMPUTE: tl.constexpr):
    if COMPUTE == 1:
        y = x.to(tl.float16)
    elif COMPUTE == 2:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _load_sum(ptr, stride_s, n_split, offs, mask):
    """fp32 sum of ptr[s * stride_s + offs] over the n_split slices of a split-K partial buffer, in a
    fixed order (deterministic); n_split = 1 is a plain load."""
    acc = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in range(1, n_split):
        acc += tl.load(ptr + offs + s * stride_s, mask=mask, other=0.0).to(tl.float32)  # s * stride_s < 2**31 (a buffer size)
    return acc


@triton.jit
def _gate_tile(idx_ptr, g_ptr, stride_idx, stride_g, rows64, row_mask, ranks, mask, n_slots, n_blocks, block,
               ROUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-rank gate [BLOCK_M, BLOCK_R] where routing is elementwise on H: DENSE gathers one gate per block;
    SAME sums the gates of the slots that select each rank's block (-1 and out-of-range slots match nothing)."""
    if ROUTE == 0:
        gate = tl.load(g_ptr + rows64[:, None] * stride_g + (ranks // block)[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    else:
        gate = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(n_slots):
            i = tl.load(idx_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            g = tl.load(g_ptr + rows64 * stride_g + j, mask=row_mask, other=0.0).to(tl.float32)
            hit = ((ranks // block)[None, :] == i[:, None]) & (i < n_blocks)[:, None] & mask
            gate += tl.where(hit, g[:, None], 0.0)
    return gate


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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # Casting after the load is also the interpreter's bf16 workaround (COMPUTE is fp32 there).
        acc = tl.dot(_to_compute(a, COMPUTE), _to_compute(b, COMPUTE), acc, input_precision=PRECISION)
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(_to_compute(a, COMPUTE), _to_compute(b, COMPUTE), acc, input_precision=PRECISION)
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


# ----------------------------------------------------------------------------------------------
# Launch configuration: fixed tiles, no autotuning (see DESIGN.md "Tiles")
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch. For GEMMs: C[M, N] with reduction K (block_k); every tl.dot
    dimension must be >= 16 on a GPU (the interpreter accepts less and would hide the bug)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Starting points for Hopper/Ampere. A search on an H100 (benchmarks/tune_kernel_tiles.py) found nothing
# better by more than its noise: the op was launch-bound there (DESIGN.md "Measured").
GPU_TILES = {
    "shrink": Tiles(128, 64, 64, 4, 4),    # H = x A^T         M=tokens N=ranks K=d_in
    "expand": Tiles(128, 128, 64, 8, 2),   # y = out + sHgB^T  M=tokens N=d_out K=ranks
    "grad_hg": Tiles(128, 64, 64, 4, 4),   # dHg = s dY B      M=tokens N=ranks K=d_out
    "grad_x": Tiles(128, 128, 64, 8, 2),   # dX = dH A         M=tokens N=d_in  K=ranks
    "grad_a": Tiles(64, 128, 64, 4, 3),    # dA = dH^T x       M=ranks  N=d_in  K=tokens (split)
    "grad_b": Tiles(128, 64, 64, 4, 3),    # dB = s dY^T Hg    M=d_out  N=ranks K=tokens (split)
    "routing": Tiles(64, 64, 64, 4, 1),    # H_g, dH, dg       block_m=tokens block_n=ranks (no dot)
    "sum": Tiles(1024, 1, 1, 4, 1),        # split-K sums      block_m=elements (no dot)
}
# The interpreter costs ~7 ms per program x loop trip whatever the tile, so use few, large tiles.
INTERPRET_TILES = {name: Tiles(64, 64, 64, 1, 1) for name in GPU_TILES}
INTERPRET_TILES["sum"] = Tiles(4096, 1, 1, 1, 1)


def tiles_for(name: str, interpret: bool = INTERPRET) -> Tiles:
    return (INTERPRET_TILES if interpret else GPU_TILES)[name]


def _launch_opts(t: Tiles, dtype: torch.dtype) -> dict:
    """num_warps/num_stages; fp32 tiles are twice the bytes, so fewer stages keep shared memory
    under the 227 KiB an H100 block may use (tests compile every GPU launch for sm_90 to check)."""
    stages = min(t.num_stages, 3) if dtype == torch.float32 else t.num_stages
    return {"num_warps": t.num_warps, "num_stages": stages}


def _compute(dtype: torch.dtype) -> tuple[int, str]:
    """tl.dot operand dtype code and fp32 precision for an input dtype (accumulation is always fp32)."""
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 and not INTERPRET  # follow torch's fp32 matmul setting
        return _F32, ("tf32" if tf32 else "ieee")
    if INTERPRET and dtype == torch.bfloat16:  # bf16 arithmetic is broken in the interpreter
        return _F32, "ieee"
    return (_F16 if dtype == torch.float16 else _BF16), "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(device: torch.device, grid_mn: int, k_tiles: int) -> int:
    """Slices for a splittable reduction of k_tiles tiles with grid_mn output tiles (before clamping).
    On a GPU: about one wave of programs, for a reduction of more than 16 tiles (a short one saved no
    time and cost a launch). Under the interpreter: a few slices, so that tests exercise the path."""
    if device.type == "cuda":
        return triton.cdiv(_sm_count(device.index or 0), grid_mn) if k_tiles > 16 else 1
    return triton.cdiv(4, grid_mn)


def _static(*values) -> bool:
    return all(isinstance(v, int) for v in values)  # SymInts (dynamic-shape tracing) are not cached


@functools.lru_cache(maxsize=4096)
def _gemm_plan_cached(m, n, k, tiles: Tiles, split: bool, device: torch.device):
    return _gemm_plan_uncached(m, n, k, tiles, split, device)


def _gemm_plan_uncached(m, n, k, tiles, split, device):
    """(grid, slices, k_per_split) of one GEMM launch."""
    grid_mn = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    k_tiles = triton.cdiv(k, tiles.block_k)
    splits = max(1, min(k_tiles, _split_count(device, grid_mn, k_tiles))) if split else 1
    k_per_split = triton.cdiv(k_tiles, splits) * tiles.block_k
    splits = triton.cdiv(k, k_per_split)
    return (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), splits), splits, k_per_split


def _gemm_plan(m, n, k, tiles, split, device):
    """The launch plan of a GEMM, computed once per shape (the op is called with the same few shapes
    every step, so a step does no launch arithmetic)."""
    if _static(m, n, k):
        return _gemm_plan_cached(m, n, k, tiles, split, device)
    return _gemm_plan_uncached(m, n, k, tiles, split, device)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _launch(kernel, grid, *args, **meta) -> None:
    """Every Triton launch goes through here. On a GPU, `wrap_triton` makes the launch visible to
    torch.compile (Inductor then launches the compiled kernel itself, without the JIT's per-call argument
    binding) and is a plain launch otherwise. Under the interpreter the ops are opaque and their fake
    implementation is this same code: fake tensors (shape propagation) launch nothing."""
    if INTERPRET:
        if not any(isinstance(a, FakeTensor) for a in args):
            kernel[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _gemm(a, b, *, tiles: Tiles, compute: torch.dtype, alpha=1.0, out_dtype=torch.float32, split=False,
          add=None, gate=None):
    """alpha * a @ b (+ add) with fp32 accumulation (a, b: 2-D, any strides; add: row-major [M, N]).

    Returns (c, hg). c is the [M, N] result in out_dtype, or, when split=True cut the reduction into S > 1
    slices, their fp32 [S, M, N] partials for the consumer to sum in a fixed order (deterministic). Used
    wherever one output side is only R wide (H, dH_g, dA, dB): 8192 tokens x R=64 in 128 x 64 tiles is
    64 programs, half an H100. gate = (route, idx, gates, block) on an unsplit shrink also stores
    hg = route(c) from the epilogue (DENSE, SAME); hg is None otherwise."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0 or k == 0:
        c = torch.zeros(m, n, device=a.device, dtype=out_dtype) if add is None else add.to(out_dtype, copy=True)
        return c, (torch.zeros_like(c, dtype=torch.float32) if gate is not None else None)
    grid, splits, k_per_split = _gemm_plan(m, n, k, tiles, split and add is None, a.device)
    new = functools.partial(torch.empty, device=a.device)
    c = new((splits, m, n), dtype=torch.float32) if splits > 1 else new((m, n), dtype=out_dtype)
    gated = gate is not None and splits == 1
    hg = new((m, n), dtype=torch.float32) if gated else None
    route, idx, gates, block = gate if gated else (DENSE, None, None, 1)
    dot_dtype, precision = _compute(compute)
    # Unused pointers point at the input a, never at an output: torch.compile's capture decides which tensors a
    # kernel writes from its compiled code, and an output passed twice would be copied for each parameter.
    _launch(
        _matmul_kernel, grid,
        a, b, c, add if add is not None else a, hg if gated else a,        # A, B, C, ADD, H_g
        idx if idx is not None else a, gates if gated else a,                # routing indices, gates
        m, n, k, k_per_split, alpha,                                         # M, N, K, k_per_split, alpha
        gates.shape[1] if gated else 0, n // block, block,                   # n_slots, n_blocks, block
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),                  # stride_am, _ak, _bk, _bn
        c.stride(0) if splits > 1 else 0, c.stride(-2), c.stride(-1),        # stride_cs (split), _cm, _cn
        add.stride(0) if add is not None else 0,                             # stride_add
        idx.stride(0) if idx is not None else 0, gates.stride(0) if gated else 0,  # stride_idx, stride_g
        ADD=add is not None, GATE=gated, ROUTE=route, COMPUTE=dot_dtype, PRECISION=precision,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, **_launch_opts(tiles, compute),
    )
    return c, hg


def _slices(t):
    """(slice count, slice stride, row stride) of an [N, R] matrix or an [S, N, R] partial buffer."""
    return (t.shape[0], t.stride(0), t.stride(1)) if t.dim() == 3 else (1, 0, t.stride(0))


def _routing(h, dhg, idx_a, idx_b, gates, block, route, *, store_h=False, need_hg=False, need_dh=False,
             need_dg=False, dh_dtype=torch.float32):
    """(H, H_g, dH, dg) from H and dH_g ([N, R], or split-K partials [S, N, R] that are summed here); those
    not asked for come back as None. H (store_h) is the summed H, for the backward."""
    n, r = h.shape[-2:]
    new = functools.partial(torch.empty, device=h.device)
    h_out = new((n, r), dtype=torch.float32) if store_h else None
    hg = new((n, r), dtype=torch.float32) if need_hg else None
    dh = new((n, r), dtype=dh_dtype) if need_dh else None
    dg = new(gates.shape, dtype=gates.dtype) if need_dg else None
    if n == 0 or not (store_h or need_hg or need_dh or need_dg):
        return h_out, hg, dh, dg
    t = tiles_for("routing")
    n_blocks = r // block
    n_slots = gates.shape[1] if gates is not None and route != DENSE else 0
    block_s = triton.next_power_of_2(min(n_blocks, 64) if route == DENSE else max(n_slots, 1))
    dhg_ = dhg if dhg is not None else h  # unused when neither dH nor dg is wanted
    h_splits, stride_hs, stride_h = _slices(h)
    dhg_splits, stride_dhgs, stride_dhg = _slices(dhg_)
    ia = idx_a if idx_a is not None else h  # dense and ungated modes read no indices
    ib = idx_b if idx_b is not None else ia
    g = gates if gates is not None else h
    _launch(
        _routing_kernel, (triton.cdiv(n, t.block_m),),
        h, dhg_, ia, ib, g,                                                   # H, dH_g, iA, iB, gates
        h_out if store_h else h, hg if need_hg else h, dh if need_dh else h, dg if need_dg else h,  # outputs
        n, r, n_slots, n_blocks, block, h_splits, dhg_splits,                 # N, R, n_slots, ..., splits
        stride_hs, stride_h, stride_dhgs, stride_dhg,                         # H's, dH_g's slice / row strides
        idx_a.stride(0) if idx_a is not None else 0,                          # stride_idx
        gates.stride(0) if gates is not None else 0, dg.stride(0) if need_dg else 0,  # stride_g, stride_dg
        ROUTE=route, STORE_H=store_h, STORE_HG=need_hg, STORE_DH=need_dh, STORE_DG=need_dg,
        BLOCK_M=t.block_m, BLOCK_R=t.block_n, BLOCK_S=block_s, **_launch_opts(t, torch.float32),
    )
    return h_out, hg, dh, dg


def _grad_hg_routed(dy, B, h, idx, gates, scaling, block, route, *, need_hg, need_dh, need_dg, dh_dtype):
    """(H_g, dH, dg) straight from the dH_g GEMM's epilogue (`_grad_hg_kernel`); None for those not asked for."""
    (n, d_out), r = dy.shape, B.shape[1]
    t = tiles_for("grad_hg")
    new = functools.partial(torch.empty, device=dy.device)
    hg = new((n, r), dtype=torch.float32) if need_hg else None
    dh = new((n, r), dtype=dh_dtype) if need_dh else None
    dg = new(gates.shape, dtype=gates.dtype) if need_dg else None
    dot_dtype, precision = _compute(B.dtype)
    _launch(
        _grad_hg_kernel, (triton.cdiv(n, t.block_m), triton.cdiv(r, t.block_n)),
        dy, B, h, idx if idx is not None else dy, gates,                       # dY, B, H, indices, gates
        hg if need_hg else dy, dh if need_dh else dy, dg if need_dg else dy,   # outputs (dummies: never written)
        n, r, d_out, scaling, gates.shape[1] if route == SAME else 0, r // block, block,  # M, N, K, alpha, ...
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), h.stride(0),     # stride_dym, _dyk, _bk, _bn, _h
        idx.stride(0) if idx is not None else 0, gates.stride(0), dg.stride(0) if need_dg else 0,
        ROUTE=route, STORE_HG=need_hg, STORE_DH=need_dh, STORE_DG=need_dg, COMPUTE=dot_dtype, PRECISION=precision,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, **_launch_opts(t, B.dtype),
    )
    return hg, dh, dg


def _fused_grad_hg(dy, B, block, route, need_dh, need_g) -> bool:
    """Whether the routing's backward runs in the dH_g GEMM's epilogue: elementwise routing, every block
    inside one rank tile, and an unsplit reduction over d_out."""
    t = tiles_for("grad_hg")
    (n, d_out), r = dy.shape, B.shape[1]
    if route not in (DENSE, SAME) or not (need_dh or need_g) or t.block_n % block or 0 in (n, d_out, r):
        return False
    return _gemm_plan(n, r, d_out, t, True, dy.device)[1] == 1


def _sum_splits(results):
    """Each (c, dtype): c itself when unsplit ([M, N]), else its [S, M, N] partials summed and cast to
    dtype -- all of them in one launch (up to two: the weight gradients dA and dB)."""
    todo = [(i, c, torch.empty(c.shape[1:], device=c.device, dtype=dt))
            for i, (c, dt) in enumerate(results) if c is not None and c.dim() == 3]
    out = [c for c, _ in results]
    if not todo:
        return out
    assert len(todo) <= 2, "one launch sums at most two partial buffers"
    t = tiles_for("sum")
    _, c1, d1 = todo[0]
    _, c2, d2 = todo[1] if len(todo) == 2 else (None, c1, c1.new_empty(0))  # one buffer: no program reads a second
    n1, n2 = d1.numel(), d2.numel()
    _launch(_sum_slices_kernel, (triton.cdiv(n1, t.block_m) + triton.cdiv(n2, t.block_m),),
            c1, d1, n1, c1.shape[0], c2, d2, n2, c2.shape[0],  # src1, dst1, numel1, splits1, then buffer 2
            BLOCK=t.block_m, **_launch_opts(t, torch.float32))
    for i, _, d in todo:
        out[i] = d
    return out


def _matmul(a, b, *, tiles: Tiles, compute=torch.float32, alpha=1.0, out_dtype=torch.float32, split=False,
            add=None):
    """alpha * a @ b (+ add) as one tensor: `_gemm` with any split-K partials summed."""
    return _sum_splits([(_gemm(a, b, tiles=tiles, compute=compute, alpha=alpha, out_dtype=out_dtype, split=split,
                               add=add)[0], out_dtype)])[0]


# ----------------------------------------------------------------------------------------------
# The operators: forward and backward as torch.library ops, the backward through register_autograd
# ----------------------------------------------------------------------------------------------

def _forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: Optional[torch.Tensor],
             h: Optional[torch.Tensor], out: Optional[torch.Tensor], idx_a: Optional[torch.Tensor],
             idx_b: Optional[torch.Tensor], scaling: float, block: int, route: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, H): y = out + s * route(H) B^T, H = x A^T (fp32, saved for the backward; empty when h is given)."""
    ib = idx_b if route == SEPARATE else idx_a
    if h is None:
        gate = (route, idx_a, gates, block) if route in (DENSE, SAME) else None
        hmat, hg = _gemm(x, A.t(), tiles=tiles_for("shrink"), compute=x.dtype, split=True, gate=gate)
        if hmat.dim() == 3 or route == SEPARATE:  # split partials, or a gather across rank tiles
            hmat, hg, _, _ = _routing(hmat, None, idx_a, ib, gates, block, route, store_h=True,
                                      need_hg=route != UNGATED)
        saved = hmat
        hg = hmat if route == UNGATED else hg
    else:
        saved = x.new_empty(0, dtype=torch.float32)
        hg = h if route == UNGATED else _routing(h, None, idx_a, ib, gates, block, route, need_hg=True)[1]
    # Route once per token, then a plain GEMM: routing inside the expand would redo it for every
    # output column tile (d_out / BLOCK_N times), which cost more than the GEMM itself on an H100.
    y, _ = _gemm(hg, B.t(), alpha=scaling, out_dtype=B.dtype, tiles=tiles_for("expand"), compute=B.dtype, add=out)
    return y, saved


def _backward(dy: torch.Tensor, x: Optional[torch.Tensor], A: Optional[torch.Tensor], B: torch.Tensor,
              gates: Optional[torch.Tensor], h: torch.Tensor, idx_a: Optional[torch.Tensor],
              idx_b: Optional[torch.Tensor], scaling: float, block: int, route: int, h_given: bool,
              need_x: bool, need_a: bool, need_b: bool, need_g: bool, need_h: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dg, dh); an empty tensor for each gradient not asked for. h: the forward's H (or the
    caller's h when h_given: then dh is its gradient and x, A get theirs through the caller's graph)."""
    dy = dy.contiguous()
    ib = idx_b if route == SEPARATE else idx_a
    need_dh = need_h if h_given else (need_x or need_a)
    dh_dtype = h.dtype if h_given else torch.float32
    dhg = None  # dL/dH_g = s * dY B, [N, R] or split partials
    fused = _fused_grad_hg(dy, B, block, route, need_dh, need_g)
    if (need_dh or need_g) and not fused:
        dhg, _ = _gemm(dy, B, alpha=scaling, tiles=tiles_for("grad_hg"), compute=B.dtype, split=True)
    if fused:  # dH_g's GEMM also routes it back: H_g, dH and dg from its epilogue, no routing kernel
        hg, dh, dg = _grad_hg_routed(dy, B, h, idx_a, gates, scaling, block, route, need_hg=need_b,
                                     need_dh=need_dh, need_dg=need_g, dh_dtype=dh_dtype)
    elif route == UNGATED:  # H_g = H, dH = dH_g: a routing launch only to sum split partials
        hg, dh, dg = h, None, None
        if need_dh:
            dh = dhg if dhg.dim() == 2 and dhg.dtype == dh_dtype else _routing(
                dhg, dhg, None, None, None, block, UNGATED, need_dh=True, dh_dtype=dh_dtype)[2]
    else:
        # H_g = route(H); dH = g-weighted dH_g moved back to the A ranks; dg = <dH_g, H> per slot.
        _, hg, dh, dg = _routing(h, dhg, idx_a, ib, gates, block, route, need_hg=need_b, need_dh=need_dh,
                                 need_dg=need_g, dh_dtype=dh_dtype)
    dB = dA = dx = None
    if need_b:  # dB = s * dY^T H_g, reduced over tokens
        dB, _ = _gemm(dy.t(), hg, alpha=scaling, out_dtype=B.dtype, tiles=tiles_for("grad_b"), compute=B.dtype,
                      split=True)
    if not h_given:
        if need_x:  # dX = dH A
            dx, _ = _gemm(dh, A, out_dtype=x.dtype, tiles=tiles_for("grad_x"), compute=A.dtype)
        if need_a:  # dA = dH^T x, reduced over tokens
            dA, _ = _gemm(dh.t(), x, out_dtype=A.dtype, tiles=tiles_for("grad_a"), compute=x.dtype, split=True)
    dB, dA = _sum_splits([(dB, B.dtype), (dA, A.dtype if A is not None else B.dtype)])
    dh = dh if h_given else None
    # Operator outputs may not alias each other: a fresh empty tensor for each gradient not computed.
    return tuple(t if t is not None else dy.new_empty(0) for t in (dx, dA, dB, dg, dh))


def _operator(name: str, fn):
    """A torch.library operator moelora::<name> running fn. On a GPU a `triton_op`: torch.compile traces
    into it and Inductor sees (and launches) the kernels. Under the interpreter, whose kernels cannot be
    captured, an opaque `custom_op` named <name>_interpreted whose fake implementation is fn itself (no
    launch on fake tensors). The names differ so that tests/kernels/conftest.py can reload this module
    under the interpreter after another test imported it compiled; a reload in the same mode reuses the op."""
    from torch._library.custom_ops import OPDEFS

    qualname = f"moelora::{name}_interpreted" if INTERPRET else f"moelora::{name}"
    if qualname in OPDEFS:
        return OPDEFS[qualname]
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


rank_activation_fwd = _operator("rank_activation_fwd", _forward)
rank_activation_bwd = _operator("rank_activation_bwd", _backward)


def _setup_context(ctx, inputs, output):
    x, A, B, gates, h, out, idx_a, idx_b, scaling, block, route = inputs
    h_given = h is not None
    # Saved: H (small, fp32), not H_g (recomputed by the routing kernel); x and A only when they get gradients here.
    ctx.save_for_backward(None if h_given else x, None if h_given else A, B, gates, h if h_given else output[1],
                          idx_a, idx_b)
    ctx.meta = (scaling, block, route, h_given, out is not None)
    # The saved H is not an output anyone differentiates: no zero-filled gradient is made for it (a launch).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _gradients(ctx, dy, _d_saved_h):
    x, A, B, gates, h, idx_a, idx_b = ctx.saved_tensors
    scaling, block, route, h_given, has_out = ctx.meta
    need_x, need_a, need_b, need_g, need_h, need_out = ctx.needs_input_grad[:6]
    need_x, need_a = need_x and not h_given, need_a and not h_given
    dx, dA, dB, dg, dh = rank_activation_bwd(dy, x, A, B, gates, h, idx_a, idx_b, scaling, block, route, h_given,
                                             need_x, need_a, need_b, need_g and gates is not None, need_h)
    return (dx if need_x else None, dA if need_a else None, dB if need_b else None,
            dg if need_g and gates is not None else None, dh if need_h else None,
            dy if need_out and has_out else None, None, None, None, None, None)


rank_activation_fwd.register_autograd(_gradients, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, A, B, idx_a, idx_b, gates, block, h, out):
    """Reject what the kernels do not handle, with a message naming the argument."""
    def bad(msg):
        raise ValueError(f"rank_activation (triton): {msg}")

    if x.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        bad(f"x, A, B must be 2-D (flatten tokens first); got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    n, d_in = x.shape
    r = A.shape[0]
    if A.shape[1] != d_in or B.shape[1] != r:
        bad(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if block < 1 or r % block:
        bad(f"block={block} must divide the rank count A.shape[0]={r}")
    if x.dtype not in _FLOATS or A.dtype != x.dtype or B.dtype != x.dtype:
        bad(f"x, A, B must share one of fp32/fp16/bf16; got {x.dtype}, {A.dtype}, {B.dtype}")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("rank_activation (triton): CPU tensors need Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before moelora.kernels is first imported, or use MOELORA_BACKEND=torch")
    tensors = [t for t in (x, A, B, gates, idx_a, idx_b, h, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        bad("all tensors must be on one device")
    if (idx_a is None) != (idx_b is None):
        bad("give both idx_a and idx_b, or neither (dense routing)")
    if idx_a is None:
        if gates is not None and gates.shape != (n, r // block):
            bad(f"dense routing needs gates [N, E] = {(n, r // block)}; got {tuple(gates.shape)}")
    else:
        if idx_a.shape != idx_b.shape or idx_a.dim() != 2 or idx_a.shape[0] != n:
            bad(f"idx_a and idx_b must both be [N, k] with N={n}; got {tuple(idx_a.shape)}, {tuple(idx_b.shape)}")
        if idx_a.dtype not in (torch.int64, torch.int32) or idx_b.dtype != idx_a.dtype:
            bad(f"block indices must be int64 (or int32); got {idx_a.dtype}, {idx_b.dtype}")
        if gates is None or gates.shape != idx_a.shape:
            bad(f"gates must match the indices' shape {tuple(idx_a.shape)}; got "
                f"{None if gates is None else tuple(gates.shape)}")
        # A host-side check costs nothing on CPU; on GPU it would sync, and torch.compile would break the graph.
        if not x.is_cuda and idx_a.numel() and not torch.compiler.is_compiling():
            e = r // block
            if int(torch.minimum(idx_a, idx_b).min()) < -1 or int(torch.maximum(idx_a, idx_b).max()) >= e:
                bad(f"block indices must lie in [-1, {e})")
    if gates is not None and not gates.is_floating_point():
        bad(f"gates must be floating point; got {gates.dtype}")
    if h is not None and (h.shape != (n, r) or not h.is_floating_point()):
        bad(f"h must be a float [N, R] = {(n, r)} tensor; got {tuple(h.shape)} {h.dtype}")
    if out is not None and (out.shape != (n, B.shape[0]) or out.dtype != x.dtype):
        bad(f"out must be [N, d_out] = {(n, B.shape[0])} in {x.dtype}; got {tuple(out.shape)} {out.dtype}")


def rank_activation_triton(x, A, B, idx_a, idx_b, gates, scaling, block=1, h=None, out=None):
    """Triton path of `moelora.ops.rank_activation` (same contract; see that function).

    `gates=None` with dense routing is plain LoRA (a gate of 1 on every rank, no routing at all).
    `h`: when given, the forward uses it instead of computing x A^T, and its gradient goes to `h`
    (x and A get none from this op) -- exactly what the torch path does, so a caller that computed h
    from x and A (e.g. stacked with its router GEMM) gets the same dx and dA through its own graph.
    Index equality is decided by identity: pass the same tensor for idx_a and idx_b to get the cheaper
    shared-selection kernel (equal but distinct tensors are still correct, via the general gather).
    Out-of-range indices are rejected on CPU; on GPU they are masked (no read) without a host sync.
    """
    if torch.is_autocast_enabled(x.device.type):  # match the torch path's matmul dtype under autocast
        dt = torch.get_autocast_dtype(x.device.type)
        x, A, B = x.to(dt), A.to(dt), B.to(dt)
        out = out.to(dt) if out is not None else None
    _check(x, A, B, idx_a, idx_b, gates, block, h, out)
    if idx_a is None:
        route = UNGATED if gates is None else DENSE
    elif idx_a is idx_b:
        route = SAME
    else:
        route = SEPARATE
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    gates = gates.contiguous() if gates is not None else None
    # SMoRA's h is a column slice of its [router | A] GEMM: rows may be strided, ranks must be contiguous.
    h = h if h is None or h.stride(-1) == 1 else h.contiguous()
    out = out.contiguous() if out is not None else None
    if idx_a is not None:
        idx_a = idx_a.contiguous()
        idx_b = idx_b.contiguous() if route == SEPARATE else None  # SAME: one index tensor
    y, _ = rank_activation_fwd(x, A, B, gates, h, out, idx_a, idx_b, float(scaling), int(block), route)
    return y
