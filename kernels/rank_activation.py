"""Triton kernels for `moelora.ops.rank_activation` (forward and backward). Design: kernels/DESIGN.md.

    y[n] = out[n] + s * sum_j g[n, j] * B[:, blk(iB[n, j])] @ (A[blk(iA[n, j]), :] @ x[n])

Layers, as in ScatterMoE: `@triton.jit` kernels -> thin launchers -> one autograd.Function whose
forward/backward read like the math -> `rank_activation_triton` (same signature as the torch path).

Every routing pattern runs as "dense shrink -> route -> dense expand" over all R = E*block ranks:
at the ranks these methods use the branch is memory-bound, so skipping inactive ranks saves FLOPs
that do not bind (DESIGN.md). Routing runs once per token in one kernel that writes the gated H_g
([N, R] fp32, small) for a plain expand GEMM, never as an [N, k, d] gather. Nothing uses atomics: weight gradients are split over tokens into fp32
partials that torch sums in a fixed order, so results are bitwise reproducible on one machine.

CPU: set TRITON_INTERPRET=1 *before* importing this module (Triton reads it at decoration time).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

__all__ = ["rank_activation_triton", "RankActivation", "Tiles", "tiles_for", "INTERPRET"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Routing modes (a constexpr in the kernels).
DENSE, SAME, SEPARATE = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, add_ptr, M, N, K, k_per_split, alpha,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn, stride_add,
    ADD: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[s] = alpha * A[:, Ks] @ B[Ks, :] (+ ADD[:, :]) for the s-th slice Ks of K (program axis 2), fp32
    accumulate.

    Strides make transposes free (dA = dH^T x reads dH column-major). With one slice, C is the result;
    with several, C is an fp32 [S, M, N] partial buffer the launcher sums (deterministic split-K). ADD
    (one slice only) adds a row-major [M, N] input in the epilogue (vLLM's ADD_INPUTS): the expand adds the
    base output there, so y is read and written exactly once.
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
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=PRECISION)
    acc = acc * alpha
    mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(add_ptr + offs_m[:, None] * stride_add + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    c = c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route(
    src_ptr, stride_src, isrc_ptr, idst_ptr, g_ptr, stride_idx, stride_g,
    rows, row_mask, ranks, rank_mask, n_slots, n_blocks, block,
    ROUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Routed [BLOCK_M, BLOCK_R] tile of an [N, R] rank matrix (fp32):

        dst[m, c] = sum_j g[m, j] * src[m, isrc[m, j]*block + c - idst[m, j]*block]   for c in blk(idst[m, j])

    Forward: src = H, isrc = iA, idst = iB gives the gated, B-aligned H_g. Backward: src = dH_g with
    the roles swapped gives dH. Slots with an index outside [0, E) (the -1 "no adapter") add nothing.
    """
    # One branch per constexpr mode and a single return: Triton compiles code after an early
    # return in a constexpr branch too, and it would not type-check with dense mode's dummy pointers.
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & rank_mask[None, :]
    if ROUTE == 0:  # DENSE: gates [N, E], one per block, a gathered load (no slot loop)
        tile = tl.load(src_ptr + rows64[:, None] * stride_src + ranks[None, :], mask=mask, other=0.0)
        gate = tl.load(g_ptr + rows64[:, None] * stride_g + (ranks // block)[None, :], mask=mask, other=0.0)
        res = tile.to(tl.float32) * gate.to(tl.float32)
    elif ROUTE == 1:  # SAME (iA == iB): a per-rank gate mask on the contiguous tile, as the torch path
        tile = tl.load(src_ptr + rows64[:, None] * stride_src + ranks[None, :], mask=mask, other=0.0)
        gmask = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(n_slots):
            i = tl.load(isrc_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            g = tl.load(g_ptr + rows64 * stride_g + j, mask=row_mask, other=0.0).to(tl.float32)
            hit = ((ranks // block)[None, :] == i[:, None]) & (i < n_blocks)[:, None] & mask
            gmask += tl.where(hit, g[:, None], 0.0)
        res = tile.to(tl.float32) * gmask
    else:  # SEPARATE (iA != iB): gather block isrc of each row and move it onto the ranks of block idst
        res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(n_slots):
            i_src = tl.load(isrc_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            i_dst = tl.load(idst_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
            g = tl.load(g_ptr + rows64 * stride_g + j, mask=row_mask, other=0.0).to(tl.float32)
            valid = (i_src >= 0) & (i_src < n_blocks) & (i_dst >= 0) & (i_dst < n_blocks)
            hit = ((ranks // block)[None, :] == i_dst[:, None]) & valid[:, None] & mask
            cols = ranks[None, :] + ((i_src - i_dst) * block)[:, None]
            v = tl.load(src_ptr + rows64[:, None] * stride_src + cols, mask=hit, other=0.0)
            res += g[:, None] * v.to(tl.float32)
    return res


@triton.jit
def _routing_kernel(
    h_ptr, dhg_ptr, idx_a_ptr, idx_b_ptr, g_ptr, hg_ptr, dh_ptr, dg_ptr,
    N, R, n_slots, n_blocks, block,
    stride_h, stride_dhg, stride_idx, stride_g, stride_hg, stride_dh, stride_dg,
    ROUTE: tl.constexpr, STORE_HG: tl.constexpr, STORE_DH: tl.constexpr, STORE_DG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per token tile, the routing and its backward (all [N, R] fp32 except dg), each computed once per token:
    H_g = route(H) (the forward's expand input, and dB's), dH = route^T(dH_g) (for dX, dA) and
    dg[n, j] = <dH_g[blk iB], H[blk iA]>."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, BLOCK_S)
    dg = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < R
        mask = row_mask[:, None] & rank_mask[None, :]
        if STORE_HG:
            hg = _route(h_ptr, stride_h, idx_a_ptr, idx_b_ptr, g_ptr, stride_idx, stride_g,
                        rows, row_mask, ranks, rank_mask, n_slots, n_blocks, block, ROUTE, BLOCK_M, BLOCK_R)
            tl.store(hg_ptr + rows64[:, None] * stride_hg + ranks[None, :], hg, mask=mask)
        if STORE_DH:
            dh = _route(dhg_ptr, stride_dhg, idx_b_ptr, idx_a_ptr, g_ptr, stride_idx, stride_g,
                        rows, row_mask, ranks, rank_mask, n_slots, n_blocks, block, ROUTE, BLOCK_M, BLOCK_R)
            tl.store(dh_ptr + rows64[:, None] * stride_dh + ranks[None, :], dh, mask=mask)
        if STORE_DG and ROUTE != 0:
            # Partial <dH_g, H> of each slot over this rank chunk, on the A-side ranks.
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ranks[None, :], mask=mask, other=0.0).to(tl.float32)
            for j in range(n_slots):
                ia = tl.load(idx_a_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
                ib = tl.load(idx_b_ptr + rows64 * stride_idx + j, mask=row_mask, other=-1)
                valid = (ia >= 0) & (ia < n_blocks) & (ib >= 0) & (ib < n_blocks)
                hit = ((ranks // block)[None, :] == ia[:, None]) & valid[:, None] & mask
                cols = ranks[None, :] + ((ib - ia) * block)[:, None]
                v = tl.load(dhg_ptr + rows64[:, None] * stride_dhg + cols, mask=hit, other=0.0)
                part = tl.sum(v.to(tl.float32) * h, axis=1)
                dg += tl.where(slots[None, :] == j, part[:, None], 0.0)
    if STORE_DG:
        if ROUTE == 0:
            # Dense: dg[n, e] = sum_t dH_g[n, e*b+t] * H[n, e*b+t], a strided walk over the block.
            for e0 in range(0, n_blocks, BLOCK_S):
                es = e0 + slots
                emask = row_mask[:, None] & (es < n_blocks)[None, :]
                acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
                for t in range(block):
                    c = (es * block + t)[None, :]
                    acc += (tl.load(dhg_ptr + rows64[:, None] * stride_dhg + c, mask=emask, other=0.0).to(tl.float32)
                            * tl.load(h_ptr + rows64[:, None] * stride_h + c, mask=emask, other=0.0).to(tl.float32))
                tl.store(dg_ptr + rows64[:, None] * stride_dg + es[None, :], acc, mask=emask)
        else:
            smask = row_mask[:, None] & (slots < n_slots)[None, :]
            tl.store(dg_ptr + rows64[:, None] * stride_dg + slots[None, :], dg, mask=smask)


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
}
# The interpreter costs ~7 ms per program x loop trip whatever the tile, so use few, large tiles.
INTERPRET_TILES = {name: Tiles(64, 64, 64, 1, 1) for name in GPU_TILES}


def tiles_for(name: str, interpret: bool = INTERPRET) -> Tiles:
    return (INTERPRET_TILES if interpret else GPU_TILES)[name]


def _launch_opts(t: Tiles, dtype: torch.dtype) -> dict:
    """num_warps/num_stages; fp32 tiles are twice the bytes, so fewer stages keep shared memory
    under the 227 KiB an H100 block may use (tests compile every GPU launch for sm_90 to check)."""
    stages = min(t.num_stages, 3) if dtype == torch.float32 else t.num_stages
    return {"num_warps": t.num_warps, "num_stages": stages}


def _compute(dtype: torch.dtype):
    """tl.dot operand dtype and fp32 precision for an input dtype (accumulation is always fp32)."""
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 and not INTERPRET  # follow torch's fp32 matmul setting
        return tl.float32, ("tf32" if tf32 else "ieee")
    if INTERPRET and dtype == torch.bfloat16:  # bf16 arithmetic is broken in the interpreter
        return tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _matmul(a, b, *, alpha=1.0, out_dtype=torch.float32, tiles: Tiles, compute=torch.float32, split=False,
            add=None):
    """alpha * a @ b (+ add) with fp32 accumulation (a, b: 2-D, any strides; add: row-major [M, N]).

    With split=True a long reduction is cut into slices whose fp32 partials torch sums (a fixed order:
    deterministic). Used wherever one output side is only R wide (H, dH_g, dA, dB): 8192 tokens x R=64 in
    128 x 64 tiles is 64 programs, half an H100. A short reduction is not split: the partial buffer and
    the sum's launch would cost more than the idle SMs (the op is launch-bound at small d: DESIGN.md)."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, device=a.device, dtype=out_dtype) if add is None else add.to(out_dtype)
    grid_mn = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    k_tiles = triton.cdiv(k, tiles.block_k)
    splits = 1
    if split and add is None:
        if a.is_cuda:  # about one wave of programs, for a reduction of more than 16 tiles
            splits = triton.cdiv(_sm_count(a.device.index or 0), grid_mn) if k_tiles > 16 else 1
        else:  # the interpreter: a few slices, so that tests exercise the path
            splits = triton.cdiv(4, grid_mn)
        splits = max(1, min(k_tiles, splits))
    k_per_split = triton.cdiv(k_tiles, splits) * tiles.block_k
    splits = triton.cdiv(k, k_per_split)
    c = torch.empty((splits, m, n) if splits > 1 else (1, m, n), device=a.device,
                    dtype=torch.float32 if splits > 1 else out_dtype)
    dot_dtype, precision = _compute(compute)
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), splits)
    _matmul_kernel[grid](
        a, b, c, add if add is not None else c, m, n, k, k_per_split, alpha,  # A, B, C, ADD, M, N, K, ..., alpha
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),  # stride_am, stride_ak, stride_bk, stride_bn
        c.stride(0), c.stride(1), c.stride(2),         # stride_cs (split), stride_cm, stride_cn
        add.stride(0) if add is not None else 0,       # stride_add
        ADD=add is not None, COMPUTE=dot_dtype, PRECISION=precision,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, **_launch_opts(tiles, compute),
    )
    return c[0] if splits == 1 else c.sum(0).to(out_dtype)


def _route_args(idx_a, idx_b, gates, h):
    """Pointers for the routing metadata; dense mode has none, so point at `h` (never read)."""
    if idx_a is None:
        return h, h, 0, gates.stride(0)
    return idx_a, idx_b, idx_a.stride(0), gates.stride(0)


def _routing(h, dhg, idx_a, idx_b, gates, block, route, n_slots, need_hg, need_dh, need_dg):
    """(H_g, dH, dg) from H (and dH_g, for the last two); those not needed come back as None."""
    n, r = h.shape
    new = functools.partial(torch.empty, device=h.device, dtype=torch.float32)
    hg = new(n, r) if need_hg else None
    dh = new(n, r) if need_dh else None
    dg = new(gates.shape) if need_dg else None
    if n == 0 or not (need_hg or need_dh or need_dg):
        return hg, dh, dg
    t = tiles_for("routing")
    n_blocks = r // block
    block_s = triton.next_power_of_2(min(n_blocks, 64) if route == DENSE else n_slots)
    ia, ib, stride_idx, stride_g = _route_args(idx_a, idx_b, gates, h)
    dhg_ = dhg if dhg is not None else h  # unused when neither dH nor dg is wanted
    _routing_kernel[(triton.cdiv(n, t.block_m),)](
        h, dhg_, ia, ib, gates,                                 # H, dH_g, iA, iB, gates
        hg if need_hg else h, dh if need_dh else h, dg if need_dg else h,  # outputs (dummies unused)
        n, r, n_slots, n_blocks, block,                         # N, R, n_slots, n_blocks, block
        h.stride(0), dhg_.stride(0), stride_idx, stride_g,      # stride_h, stride_dhg, stride_idx, stride_g
        r, r, dg.stride(0) if need_dg else 0,                   # stride_hg, stride_dh, stride_dg
        ROUTE=route, STORE_HG=need_hg, STORE_DH=need_dh, STORE_DG=need_dg,
        BLOCK_M=t.block_m, BLOCK_R=t.block_n, BLOCK_S=max(block_s, 1), **_launch_opts(t, torch.float32),
    )
    return hg, dh, dg


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class RankActivation(torch.autograd.Function):
    """y = out + s * route(H) B^T with H = x A^T (or the caller's h). Saves H (small), not H_g."""

    @staticmethod
    def forward(ctx, x, A, B, gates, h, out, idx_a, idx_b, scaling, block, route):
        n_slots = gates.shape[1]
        h_given = h is not None
        if not h_given:
            h = _matmul(x, A.t(), tiles=tiles_for("shrink"), compute=x.dtype, split=True)  # [N, R] fp32
        # Route once per token, then a plain GEMM: routing inside the expand would redo it for every
        # output column tile (d_out / BLOCK_N times), which cost more than the GEMM itself on an H100.
        hg, _, _ = _routing(h, None, idx_a, idx_b, gates, block, route, n_slots, True, False, False)
        y = _matmul(hg, B.t(), alpha=scaling, out_dtype=B.dtype, tiles=tiles_for("expand"), compute=B.dtype,
                    add=out)
        ctx.save_for_backward(None if h_given else x, None if h_given else A, B, gates, h, idx_a, idx_b)
        ctx.meta = (scaling, block, route, n_slots, h_given, out is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, gates, h, idx_a, idx_b = ctx.saved_tensors
        scaling, block, route, n_slots, h_given, has_out = ctx.meta
        need_x, need_a, need_b, need_g, need_h, need_out = ctx.needs_input_grad[:6]
        need_dh = need_x or need_a or need_h
        dy = dy.contiguous()
        dx = dA = dB = dg = dh_in = None

        dhg = None  # dL/dH_g = s * dY B                                          [N, R]
        if need_dh or need_g:
            dhg = _matmul(dy, B, alpha=scaling, tiles=tiles_for("grad_hg"), compute=B.dtype, split=True)
        # H_g = route(H); dH = g-weighted dH_g moved back to the A ranks; dg = <dH_g, H> per slot.
        hg, dh, dg = _routing(h, dhg, idx_a, idx_b, gates, block, route, n_slots, need_b, need_dh, need_g)
        if need_b:  # dB = s * dY^T H_g, reduced over tokens
            dB = _matmul(dy.t(), hg, alpha=scaling, out_dtype=B.dtype, tiles=tiles_for("grad_b"),
                         compute=B.dtype, split=True)
        if h_given:  # gradients reach x and A through the caller's graph that produced h
            dh_in = dh.to(h.dtype) if need_h else None
        else:
            if need_x:  # dX = dH A
                dx = _matmul(dh, A, out_dtype=x.dtype, tiles=tiles_for("grad_x"), compute=A.dtype)
            if need_a:  # dA = dH^T x, reduced over tokens
                dA = _matmul(dh.t(), x, out_dtype=A.dtype, tiles=tiles_for("grad_a"), compute=x.dtype, split=True)
        if dg is not None:
            dg = dg.to(gates.dtype)
        return dx, dA, dB, dg, dh_in, (dy if need_out and has_out else None), None, None, None, None, None


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
        if gates.shape != (n, r // block):
            bad(f"dense routing needs gates [N, E] = {(n, r // block)}; got {tuple(gates.shape)}")
    else:
        if idx_a.shape != idx_b.shape or idx_a.dim() != 2 or idx_a.shape[0] != n:
            bad(f"idx_a and idx_b must both be [N, k] with N={n}; got {tuple(idx_a.shape)}, {tuple(idx_b.shape)}")
        if idx_a.dtype not in (torch.int64, torch.int32) or idx_b.dtype != idx_a.dtype:
            bad(f"block indices must be int64 (or int32); got {idx_a.dtype}, {idx_b.dtype}")
        if gates.shape != idx_a.shape:
            bad(f"gates must match the indices' shape {tuple(idx_a.shape)}; got {tuple(gates.shape)}")
        if not x.is_cuda and idx_a.numel():  # a host-side check costs nothing on CPU; on GPU it would sync
            e = r // block
            if int(torch.minimum(idx_a, idx_b).min()) < -1 or int(torch.maximum(idx_a, idx_b).max()) >= e:
                bad(f"block indices must lie in [-1, {e})")
    if not gates.is_floating_point():
        bad(f"gates must be floating point; got {gates.dtype}")
    if h is not None and (h.shape != (n, r) or not h.is_floating_point()):
        bad(f"h must be a float [N, R] = {(n, r)} tensor; got {tuple(h.shape)} {h.dtype}")
    if out is not None and (out.shape != (n, B.shape[0]) or out.dtype != x.dtype):
        bad(f"out must be [N, d_out] = {(n, B.shape[0])} in {x.dtype}; got {tuple(out.shape)} {out.dtype}")


def rank_activation_triton(x, A, B, idx_a, idx_b, gates, scaling, block=1, h=None, out=None):
    """Triton path of `moelora.ops.rank_activation` (same contract; see that function).

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
        route = DENSE
    elif idx_a is idx_b:
        route = SAME
    else:
        route = SEPARATE
    x, A, B, gates = x.contiguous(), A.contiguous(), B.contiguous(), gates.contiguous()
    h = h.contiguous() if h is not None else None
    out = out.contiguous() if out is not None else None
    if idx_a is not None:
        idx_a = idx_a.contiguous()
        idx_b = idx_a if route == SAME else idx_b.contiguous()
    return RankActivation.apply(x, A, B, gates, h, out, idx_a, idx_b, float(scaling), int(block), route)
