"""Triton path of `moelora.ops.rank_activation` (forward and backward): the entry point. Design: moelora/kernels/DESIGN.md.

    y[n] = out[n] + s * sum_j g[n, j] * B[:, blk(iB[n, j])] @ (A[blk(iA[n, j]), :] @ x[n])

Layers, as in ScatterMoE, one file each: `@triton.jit` kernels (jit_tiles.py, jit_gemm.py, jit_routing.py)
-> launch plans and tiles (plans.py) and thin launchers (launchers.py) -> two PyTorch operators
(`torch.ops.moelora.rank_activation_fwd` / `_bwd`, registered with torch.library, the backward through
`register_autograd`; operators.py) -> `rank_activation_triton` here (same signature as the torch path).
Being operators, they are captured whole by torch.compile(fullgraph=True) and CUDA graphs: on a GPU they
are `triton_op`s, so Inductor sees the kernels and launches them itself; under the interpreter they are
opaque `custom_op`s whose fake implementation is the same code with the launches skipped.

Every routing pattern runs as "dense shrink -> route -> dense expand" over all R = E*block ranks:
at the ranks these methods use the branch is memory-bound, so skipping inactive ranks saves FLOPs
that do not bind (DESIGN.md). Where routing is elementwise on H (dense gates, shared selections, plain
LoRA) it runs in the shrink GEMM's epilogue; otherwise (MixLoRA's separate selections, or a split shrink)
once per token in a routing kernel that also sums the split-K partials. Nothing uses atomics: long
reductions are split into fp32 partials summed in a fixed order, so results are bitwise reproducible.

CPU: set TRITON_INTERPRET=1 *before* importing this module (Triton reads it at decoration time).
"""

import torch

# Re-exported: the names callers import from here. What tests and benchmarks patch (`_launch`, `_split_count`)
# must be patched where it is looked up: moelora.kernels.launchers and moelora.kernels.plans.
from .operators import rank_activation_bwd, rank_activation_fwd
from .plans import DENSE, GPU_TILES, INTERPRET, INTERPRET_TILES, SAME, SEPARATE, UNGATED, Tiles, tiles_for

__all__ = ["rank_activation_triton", "rank_activation_fwd", "rank_activation_bwd", "Tiles", "tiles_for", "GPU_TILES",
           "INTERPRET_TILES", "INTERPRET", "DENSE", "SAME", "SEPARATE", "UNGATED"]


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
