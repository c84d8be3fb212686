"""Tile-level `@triton.jit` helpers shared by the kernels of jit_gemm.py and jit_routing.py (inlined by Triton).

Each works on one [BLOCK_M, BLOCK_N] register tile: the cast to the dot dtype, the K loop of a tile matmul
(every GEMM kernel's), a split-K partial sum and the per-rank gate of elementwise routing.
"""

import triton
import triton.language as tl


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
def _tile_matmul(a_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, k_lo, k_hi, stride_am, stride_ak, stride_bk,
                 stride_bn, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A[offs_m, k_lo:k_hi] @ B[k_lo:k_hi, offs_n] (masked rows, columns and
    K beyond k_hi read as 0). Strides make transposes free; operands go to the dot in COMPUTE's dtype."""
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
    return acc


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
