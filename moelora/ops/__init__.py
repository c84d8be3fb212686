"""`rank_activation`: the one op every moelora method runs through (DESIGN §1).

    y = out + s * sum_j g[n, j] * B[:, blk(iB[n, j])] @ (A[blk(iA[n, j]), :] @ x[n])

Backends: plain PyTorch, and a Triton kernel (forward + backward) for CUDA tensors, registered as the
PyTorch operators `torch.ops.moelora.rank_activation_fwd` / `_bwd` so torch.compile and CUDA graphs capture it.
`MOELORA_BACKEND=torch|triton|auto` picks one. `auto` (the default) takes the path measured faster end to end:
today that is the PyTorch path on GPUs too. On an H100 the Triton kernels spend less GPU time in the
forward, but a training step is bound by kernel launches, and a Triton launch costs the host 2-3x a torch
op, so every method trained faster on the PyTorch path (benchmarks/RESULTS.md, "GPU"). `triton` opts in;
on CPU tensors it works under `TRITON_INTERPRET=1`, which is how CI tests the kernel.
"""

from __future__ import annotations

import os

import torch

from .torch_path import gate_ranks, rank_activation_loop, rank_activation_torch

__all__ = ["rank_activation", "rank_activation_torch", "rank_activation_loop", "gate_ranks", "backend_for"]

_BACKENDS = ("auto", "torch", "triton")


def backend_for(x: torch.Tensor) -> str:
    """Which path `rank_activation` takes for this input, after `MOELORA_BACKEND`."""
    choice = os.environ.get("MOELORA_BACKEND", "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"MOELORA_BACKEND={choice!r}: expected one of {', '.join(_BACKENDS)}")
    if choice == "auto":
        return "torch"  # measured faster on CPU and GPU alike (module docstring)
    return choice


_TRITON_OP = None


def _triton_op():
    """The Triton implementation, imported on first use (importing it reads TRITON_INTERPRET)."""
    global _TRITON_OP
    if _TRITON_OP is None:
        try:
            from moelora.kernels.rank_activation import rank_activation_triton
        except ImportError:
            return None
        _TRITON_OP = rank_activation_triton
    return _TRITON_OP


def rank_activation(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    idx_a: torch.Tensor | None,
    idx_b: torch.Tensor | None,
    gates: torch.Tensor,
    scaling: float,
    block: int = 1,
    h: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed low-rank update of a linear layer's output.

    Args:
        x: [N, d_in] layer input (tokens flattened).
        A: [E*block, d_in] shrink factors; B: [d_out, E*block] expand factors.
        idx_a, idx_b: [N, k] int64 block indices into A and B (-1 = empty slot), or both None for
            dense routing over all E blocks (then `gates` is [N, E]).
        gates: [N, k] (or [N, E] when dense) gate values; gradients flow into them. None with
            dense routing means a constant gate of 1 (plain LoRA).
        scaling: the method's scale s.
        block: ranks per block b (1 for rank experts, r for LoRA experts).
        h: optional precomputed x @ A^T ([N, E*block]) when a method fused it with its router GEMM.
        out: optional [N, d_out] base output; the update is added to it (returned, not in place).

    Returns:
        [N, d_out]: `out + update`, or the update alone when `out` is None.
    """
    if backend_for(x) == "triton":
        op = _triton_op()
        if op is None:
            raise RuntimeError("MOELORA_BACKEND=triton but the Triton kernel could not be imported")
        return op(x, A, B, idx_a, idx_b, gates, scaling, block, h=h, out=out)  # gates None: no routing at all
    return rank_activation_torch(x, A, B, idx_a, idx_b, gates, scaling, block, h=h, out=out)
