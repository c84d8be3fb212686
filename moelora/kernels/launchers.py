"""Thin launchers of the rank-activation kernels: allocate outputs, pick the plan, launch (ScatterMoE's layer 2).

Each returns plain tensors; the operators of operators.py compose them into the forward and backward.
Kernel arguments are commented positionally at each launch.
"""

import functools

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

from .jit_gemm import _grad_hg_kernel, _matmul_kernel
from .jit_routing import _routing_kernel, _sum_slices_kernel
from .plans import DENSE, INTERPRET, SAME, Tiles, _compute, _gemm_plan, _launch_opts, tiles_for


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
