"""The rank-activation op in plain PyTorch: the exact reference and the CPU production path.

    y[n] = s * sum_j g[n, j] * B[:, blk(iB[n, j])] @ (A[blk(iA[n, j]), :] @ x[n])

`blk(i)` is the slice of `block` consecutive ranks that makes block i. A block index of -1 means
"no block" (that slot contributes nothing), which is how "no adapter" tokens are expressed.

Formulation (DESIGN §1): at the ranks these methods use (R = E*block of at most a few hundred),
the cheapest exact way on a CPU is dense shrink -> per-rank gate -> dense expand:

    H  = x A^T                 [N, R]   one GEMM (or handed in precomputed, e.g. fused with a router)
    G  = gates scattered to the ranks of their B blocks, with H re-indexed from the A blocks
    y += s * (H_gated) B^T     [N, d_out]  one GEMM, accumulated into the base output

It never builds [N, k, d_in] gathers of A, [N, d_out, R] intermediates or a per-token delta W.
When iA == iB (every method except MixLoRA) the gate is a mask on H's columns. When they differ,
the A-side values are gathered from H at iA (an [N, k, block] tensor: small) and scattered into
the B-side ranks at iB; autograd through gather/scatter gives exact gradients for x, A, B and g.
"""

from __future__ import annotations

import torch


def _rank_index(idx: torch.Tensor, block: int) -> torch.Tensor:
    """Block indices [N, k] -> rank indices [N, k*block] (block i covers ranks i*block .. i*block+block-1)."""
    if block == 1:
        return idx
    offsets = torch.arange(block, device=idx.device, dtype=idx.dtype)
    return (idx.unsqueeze(-1) * block + offsets).flatten(-2)


def gate_ranks(
    h: torch.Tensor,
    idx_a: torch.Tensor | None,
    idx_b: torch.Tensor | None,
    gates: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """Apply routing to the shrink output H [N, R]; returns the gated, B-aligned [N, R] tensor.

    Dense routing (idx_a is idx_b is None): gates is [N, E], one weight per block, or None for 1.
    Sparse routing: idx_a/idx_b are [N, k] block indices (-1 = none), gates [N, k].
    """
    if gates is None:  # constant gate 1 on every rank (plain LoRA): nothing to do
        return h
    n, r = h.shape
    gates = gates.to(h.dtype)
    if idx_a is None and idx_b is None:
        per_rank = gates if block == 1 else gates.repeat_interleave(block, dim=-1)
        return h * per_rank
    if idx_a is None or idx_b is None:
        raise ValueError("rank_activation: give both idx_a and idx_b, or neither (dense routing)")

    # Decided without reading the indices on the host (on a GPU that would be a sync per adapted layer):
    # equal index tensors are recognised by identity (equal but distinct ones take the general path, also
    # exact), and "no block" slots (-1) point at block 0 with a zero gate, whether or not there are any.
    same = idx_a is idx_b
    gates = gates * (idx_a >= 0).to(gates.dtype)
    idx_a = idx_a.clamp(min=0)
    idx_b = idx_a if same else idx_b.clamp(min=0)

    ranks_b = _rank_index(idx_b, block)                                   # [N, k*block]
    per_rank_gate = gates if block == 1 else gates.repeat_interleave(block, dim=-1)
    if same:
        # Shared A/B selection: the gate is a sparse per-rank mask on H's columns.
        mask = h.new_zeros(n, r).scatter_add(1, ranks_b, per_rank_gate)
        return h * mask
    # Separate A and B selections (MixLoRA): move the selected A ranks to their paired B ranks.
    picked = h.gather(1, _rank_index(idx_a, block)) * per_rank_gate       # [N, k*block]
    return h.new_zeros(n, r).scatter_add(1, ranks_b, picked)


def rank_activation_torch(
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
    """Torch path of `moelora.ops.rank_activation` (see that function for the contract)."""
    if h is None:
        h = x @ A.t()
    hg = gate_ranks(h, idx_a, idx_b, gates, block)
    if out is None:
        return (hg @ B.t()) * scaling
    # addmm folds the add into the GEMM's C read: no extra pass over the [N, d_out] output.
    return torch.addmm(out, hg, B.t(), beta=1.0, alpha=scaling)


def rank_activation_loop(x, A, B, idx_a, idx_b, gates, scaling, block=1):
    """Token-by-token loop reference, written straight from the formula. Slow; tests only."""
    n = x.shape[0]
    e = A.shape[0] // block
    y = x.new_zeros(n, B.shape[0])
    for t in range(n):
        if idx_a is None:
            slots = [(j, j, gates[t, j]) for j in range(e)]
        else:
            slots = [(int(idx_a[t, j]), int(idx_b[t, j]), gates[t, j]) for j in range(idx_a.shape[1])]
        for ia, ib, g in slots:
            if ia < 0:
                continue
            a_blk = A[ia * block:(ia + 1) * block]
            b_blk = B[:, ib * block:(ib + 1) * block]
            y[t] = y[t] + scaling * g * (b_blk @ (a_blk @ x[t]))
    return y
