"""Routing patterns and reference helpers shared by the interpreter tests and the GPU checks."""

from __future__ import annotations

import torch

from moelora.ops import rank_activation_loop

# (E, block, k, routing): routing is "same" (iA is iB), "sep" (MixLoRA: per-sequence iA != iB),
# "dense" (gates [N, E]) or "modality" (k=1, a third of the tokens with no adapter).
PATTERNS = {
    "smora_r64_k8": (64, 1, 8, "same"),
    "smora_k1": (24, 1, 1, "same"),
    "smora_k_eq_E": (12, 1, 12, "same"),
    "experts_8x16_top2": (8, 16, 2, "same"),
    "experts_8x16_dense": (8, 16, None, "dense"),
    "ranks_dense": (20, 1, None, "dense"),
    "mixlora_sep": (16, 1, 4, "sep"),
    "experts_sep_b3": (5, 3, 2, "sep"),
    "modality_k1": (2, 8, 1, "modality"),
}
TOL = {  # (rtol, atol as a fraction of the reference's max magnitude)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def make_case(pattern, n=67, d_in=45, d_out=83, dtype=torch.float32, seed=0, with_out=False, device="cpu"):
    e, block, k, routing = PATTERNS[pattern] if isinstance(pattern, str) else pattern
    g = torch.Generator().manual_seed(seed)
    r = e * block
    x = torch.randn(n, d_in, generator=g)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) / r**0.5
    if routing == "dense":
        idx_a = idx_b = None
        gates = torch.rand(n, e, generator=g)
    else:
        def pick(rows):  # k distinct blocks per row
            rows = [torch.randperm(e, generator=g)[:k] for _ in range(rows)]
            return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)

        idx_a = pick(n)
        gates = torch.rand(n, k, generator=g)
        if routing == "sep":  # one choice per sequence of 10 tokens, repeated for its tokens
            seqs = -(-n // 10)
            idx_a, idx_b = pick(seqs).repeat_interleave(10, 0)[:n], pick(seqs).repeat_interleave(10, 0)[:n]
        else:
            idx_b = idx_a
        if routing == "modality":
            idx_a[::3] = -1  # text tokens: no adapter
            gates = torch.ones(n, k)
    out = torch.randn(n, d_out, generator=g) if with_out else None
    cast = lambda t: t if t is None else t.to(device, dtype)  # noqa: E731
    move = lambda t: t if t is None else t.to(device)  # noqa: E731
    if idx_a is idx_b:  # keep the identity: it selects the shared-selection kernel
        idx_a = idx_b = move(idx_a)
    else:
        idx_a, idx_b = move(idx_a), move(idx_b)
    return dict(x=cast(x), A=cast(A), B=cast(B), idx_a=idx_a, idx_b=idx_b, gates=move(gates), out=cast(out),
                block=block, scaling=0.7)


def run(fn, case, grad_out=True):
    """y and the gradients of (x, A, B, gates[, out]) for a fixed upstream gradient."""
    leaves = {n: case[n].detach().clone().requires_grad_() for n in ("x", "A", "B", "gates")}
    if case["out"] is not None and grad_out:
        leaves["out"] = case["out"].detach().clone().requires_grad_()
    kw = {"out": leaves.get("out", case["out"])} if fn is not rank_activation_loop else {}
    y = fn(leaves["x"], leaves["A"], leaves["B"], case["idx_a"], case["idx_b"], leaves["gates"],
           case["scaling"], case["block"], **kw)
    if fn is rank_activation_loop and case["out"] is not None:
        y = y + leaves["out"]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(123)).to(y.device, y.dtype)
    y.backward(dy)
    return {"y": y.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def assert_match(got, ref, tol, what=""):
    """tol: a dtype (its TOL row) or (rtol, atol as a fraction of the reference's max magnitude)."""
    rtol, frac = TOL[tol] if isinstance(tol, torch.dtype) else tol
    assert got.keys() == ref.keys()
    for name in ref:
        r, g = ref[name].float(), got[name].float()
        torch.testing.assert_close(g, r, rtol=rtol, atol=frac * max(1.0, r.abs().max().item()),
                                   msg=lambda m: f"{what} {name}: {m}")
