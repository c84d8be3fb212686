"""The rank-activation op as two PyTorch operators (`torch.ops.moelora.rank_activation_fwd` / `_bwd`) and its autograd.

`_forward` and `_backward` read as the math (DESIGN.md's table) over the launchers; `_operator` registers
each with torch.library (a `triton_op` on a GPU, an opaque `custom_op` under the interpreter), and
`register_autograd` ties the backward to the forward. Being operators, they are captured whole by
torch.compile(fullgraph=True) and CUDA graphs.
"""

from typing import Optional

import torch

from .launchers import _fused_grad_hg, _gemm, _grad_hg_routed, _routing, _sum_splits
from .plans import DENSE, INTERPRET, SAME, SEPARATE, UNGATED, tiles_for


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
