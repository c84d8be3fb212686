"""CPU benchmark of the torch path: dense-masked (ours) vs a naive per-token gather vs plain LoRA.

    python benchmarks/bench_torch_paths.py            # d=576 (SmolLM2-135M), 2048 tokens, fp32, 2 threads
    python benchmarks/bench_torch_paths.py --threads 4 --tokens 4096

Formulations of the same routed update y = s * sum_j g * B_blk(iB) A_blk(iA) x:
    dense    `rank_activation_torch`: H = x A^T over all R ranks, gate mask, one expand GEMM
    gather   what the reference implementations do: gather each token's A rows and B columns
             ([N, k, b, d] tensors) and contract per token
    lora_ra  plain LoRA with the *active* rank k*b (the FLOPs the routing actually needs)
    lora_R   plain LoRA with the *total* rank R (the FLOPs the dense path executes)
Printed as ratios (median of --repeats after --warmup runs, the formulations interleaved),
forward and forward+backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelora.ops import rank_activation_torch

# (E, block, k, routing)
PATTERNS = {
    "smora_r64_k8": (64, 1, 8, "same"),
    "experts_8x16_top2": (8, 16, 2, "same"),
    "experts_8x16_dense": (8, 16, None, "dense"),
    "mixlora_pool64_r8_sep": (64, 1, 8, "sep"),
}


def gather_path(x, A, B, idx_a, idx_b, gates, scaling, block):
    """Per-token gather of the selected factors (the naive formulation; -1 slots masked)."""
    e, d_out = A.shape[0] // block, B.shape[0]
    keep = (idx_a >= 0).to(gates.dtype)
    a_sel = A.view(e, block, -1)[idx_a.clamp(min=0)]                          # [N, k, b, d_in]
    b_sel = B.view(d_out, e, block).permute(1, 2, 0)[idx_b.clamp(min=0)]      # [N, k, b, d_out]
    h = torch.einsum("nd,nkbd->nkb", x, a_sel) * (gates * keep).unsqueeze(-1)
    return torch.einsum("nkb,nkbo->no", h, b_sel) * scaling


def lora(x, A, B, scaling):
    return (x @ A.t()) @ B.t() * scaling


def make_inputs(pattern, n, d, seq_len=256):
    e, block, k, routing = PATTERNS[pattern]
    r = e * block
    x, A, B = torch.randn(n, d), torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    if routing == "dense":
        return x, A, B, None, None, torch.softmax(torch.randn(n, e), -1), block, e * block
    if routing == "sep":
        seqs = -(-n // seq_len)
        idx_a = torch.rand(seqs, e).topk(k, -1).indices.repeat_interleave(seq_len, 0)[:n]
        idx_b = torch.rand(seqs, e).topk(k, -1).indices.repeat_interleave(seq_len, 0)[:n]
    else:
        idx_a = idx_b = torch.rand(n, e).topk(k, -1).indices
    return x, A, B, idx_a, idx_b, torch.rand(n, k), block, k * block


def timed(runs, backward, warmup, repeats):
    """Median ms per formulation. Formulations are interleaved within each repeat, so a load change
    on a shared machine hits all of them alike and the ratios stay meaningful."""
    def once(fn, leaves):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        if backward:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()
        return time.perf_counter() - t0

    samples = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, (fn, leaves) in runs.items():
            dt = once(fn, leaves)
            if i >= warmup:
                samples[name].append(dt)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, d={args.d}, {args.tokens} tokens, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print("| pattern | phase | dense ms | gather / dense | dense / LoRA(active r) | dense / LoRA(total R) |")
    print("|---|---|---|---|---|---|")
    for pattern in PATTERNS:
        x, A, B, ia, ib, g, block, r_active = make_inputs(pattern, args.tokens, args.d)
        x, A, B, g = (t.requires_grad_() for t in (x, A, B, g))
        a_act = A[:r_active].detach().clone().requires_grad_()
        b_act = B[:, :r_active].detach().clone().requires_grad_()
        runs = {
            "dense": (lambda: rank_activation_torch(x, A, B, ia, ib, g, 2.0, block), (x, A, B, g)),
            "lora_ra": (lambda: lora(x, a_act, b_act, 2.0), (x, a_act, b_act)),
            "lora_R": (lambda: lora(x, A, B, 2.0), (x, A, B)),
        }
        if ia is not None:  # dense routing has nothing to gather
            runs["gather"] = (lambda: gather_path(x, A, B, ia, ib, g, 2.0, block), (x, A, B, g))
        for phase, backward in (("fwd", False), ("fwd+bwd", True)):
            t = timed(runs, backward, args.warmup, args.repeats)
            gather = f"{t['gather'] / t['dense']:.2f}" if "gather" in t else "n/a (dense)"
            print(f"| {pattern} | {phase} | {t['dense']:.2f} | {gather} | {t['dense'] / t['lora_ra']:.2f} | "
                  f"{t['dense'] / t['lora_R']:.2f} |")
    print("Ratios > 1: the left formulation is slower. LoRA(active r) has rank k*b, LoRA(total R) rank E*b.")


if __name__ == "__main__":
    main()
