"""GPU benchmark of the rank-activation op: Triton kernel vs the torch path vs the base linear.

    python benchmarks/bench_kernel.py                     # H100 defaults: d=4096, 8192 tokens, bf16
    python benchmarks/bench_kernel.py --json > kernel.json
    python benchmarks/bench_kernel.py --peak-tflops 312 --peak-tbps 2.0   # an A100
    python benchmarks/bench_kernel.py --device cpu --tokens 64 --d 64   # the script itself, on CPU (interpreter)

For each routing pattern it times, forward and forward+backward (W frozen, x requiring grad):
    base   y = F.linear(x, W)
    triton y = F.linear(x, W) then the Triton op with out=y       (the layer as moelora runs it)
    torch  the same with the torch dense-masked path
and reports the adapter's overhead over the base linear, its speed-up over the torch path, and the
fraction of the roofline the Triton adapter reaches (ideal time = max(FLOPs / peak, bytes / bandwidth)
for the FLOPs the kernels execute and the bytes an ideal un-fused branch must move; see moelora/kernels/DESIGN.md).
Not a test: it needs a CUDA GPU and exits with a message without one. `--device cpu` runs the same code
under Triton's interpreter with a wall-clock timer, at tiny shapes, to test the script (its numbers mean
nothing: the interpreter is ~1000x slower than a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

# (E, block, k, routing) as in tests/kernels: routing same | sep | dense | modality
PATTERNS = {
    "smora_r64_k8": (64, 1, 8, "same"),
    "experts_8x16_top2": (8, 16, 2, "same"),
    "experts_8x16_dense": (8, 16, None, "dense"),
    "mixlora_pool64_r8_sep": (64, 1, 8, "sep"),
    "modality_2x16_k1": (2, 16, 1, "modality"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"


def make_inputs(pattern, n, d, dtype, device, seq_len=1024):
    e, block, k, routing = PATTERNS[pattern]
    r = e * block
    x = torch.randn(n, d, device=device, dtype=dtype)
    W = torch.randn(d, d, device=device, dtype=dtype) / d**0.5
    A = torch.randn(r, d, device=device, dtype=dtype) / d**0.5
    B = torch.randn(d, r, device=device, dtype=dtype) / r**0.5
    if routing == "dense":
        return dict(x=x, W=W, A=A, B=B, idx_a=None, idx_b=None, block=block,
                    gates=torch.softmax(torch.randn(n, e, device=device), -1))
    if routing == "sep":  # MixLoRA: A and B factors chosen per sequence, repeated for its tokens
        seqs = -(-n // seq_len)
        pick = lambda: torch.rand(seqs, e, device=device).topk(k, -1).indices  # noqa: E731
        idx_a = pick().repeat_interleave(seq_len, 0)[:n]
        idx_b = pick().repeat_interleave(seq_len, 0)[:n]
    else:
        idx_a = idx_b = torch.rand(n, e, device=device).topk(k, -1).indices
        if routing == "modality":  # a third of the tokens are text: no adapter
            idx_a[::3] = -1
    return dict(x=x, W=W, A=A, B=B, idx_a=idx_a, idx_b=idx_b, block=block,
                gates=torch.rand(n, k, device=device))


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The op's shape and patterns, shared by bench_kernel, profile_kernel and tune_kernel_tiles."""
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d", type=int, default=4096, help="d_in = d_out of the adapted linear")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))


def adapter_cost(pattern, n, d, elt):
    """(fwd FLOPs, fwd bytes, fwd+bwd FLOPs, fwd+bwd bytes) of the adapter branch alone.

    FLOPs: what the kernels execute (all R ranks: dense-masked). Bytes: the minimum an un-fused branch
    moves: forward reads x and out and writes y; backward reads dY, reads x (dA), writes dX; plus the
    factors and their gradients. H and friends (N x R) are counted once each way (small)."""
    e, block, _, _ = PATTERNS[pattern]
    r = e * block
    fwd_flops = 2 * n * r * (d + d)
    fwd_bytes = elt * (n * d + 2 * n * d + 2 * r * d) + 4 * n * r * 2
    bwd_flops = 2 * fwd_flops  # dH_g, dX, dA, dB
    bwd_bytes = elt * (n * d + n * d + n * d + 4 * r * d) + 4 * n * r * 4
    return fwd_flops, fwd_bytes, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes


def bench(fn, grads, rep_ms):
    if DEVICE == "cpu":  # triton.testing.do_bench needs a GPU: a median of a few wall-clock runs
        import statistics
        import time

        times = []
        for _ in range(3):
            for t in grads or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, grad_to_none=grads, return_mode="median")


def run_pattern(pattern, args, op_triton, op_torch):
    dtype, n, d = DTYPES[args.dtype], args.tokens, args.d
    inp = make_inputs(pattern, n, d, dtype, DEVICE)
    x = inp["x"].requires_grad_()
    A, B, gates = (inp[k].requires_grad_() for k in ("A", "B", "gates"))
    dy = torch.randn(n, d, device=DEVICE, dtype=dtype)
    scaling = 2.0

    def layer(op):
        base = F.linear(x, inp["W"])
        if op is None:
            return base
        return op(x, A, B, inp["idx_a"], inp["idx_b"], gates, scaling, inp["block"], out=base)

    times = {}
    for name, op in (("base", None), ("triton", op_triton), ("torch", op_torch)):
        with torch.no_grad():
            times[f"{name}_fwd"] = bench(lambda: layer(op), None, args.rep_ms)
        times[f"{name}_fwdbwd"] = bench(lambda: layer(op).backward(dy), [x, A, B, gates], args.rep_ms)
    f_flops, f_bytes, t_flops, t_bytes = adapter_cost(pattern, n, d, dtype.itemsize)
    peak_flops, peak_bw = args.peak_tflops * 1e12, args.peak_tbps * 1e12
    row = {"pattern": pattern, "tokens": n, "d": d, "dtype": args.dtype, **{k: round(v, 4) for k, v in times.items()}}
    for phase, flops, nbytes in (("fwd", f_flops, f_bytes), ("fwdbwd", t_flops, t_bytes)):
        base = times[f"base_{phase}"]
        tri, tor = times[f"triton_{phase}"] - base, times[f"torch_{phase}"] - base  # adapter alone, ms
        ideal_ms = max(flops / peak_flops, nbytes / peak_bw) * 1e3
        row[f"overhead_triton_{phase}"] = tri / base
        row[f"overhead_torch_{phase}"] = tor / base
        row[f"speedup_vs_torch_{phase}"] = tor / tri if tri > 0 else float("inf")
        row[f"roofline_fraction_{phase}"] = ideal_ms / tri if tri > 0 else float("nan")
        row[f"ideal_adapter_ms_{phase}"] = ideal_ms
    return row


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter: times mean nothing)"


def print_table(rows, args):
    print(f"# rank_activation on {device_name()}: {args.tokens} tokens, d={args.d}, {args.dtype}; "
          f"roofline at {args.peak_tflops} TFLOPS, {args.peak_tbps} TB/s")
    head = ("pattern", "ovh fwd", "ovh f+b", "torch ovh fwd", "torch ovh f+b", "x torch fwd", "x torch f+b",
            "roofline fwd", "roofline f+b")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["pattern"], f"{r['overhead_triton_fwd']:+.1%}", f"{r['overhead_triton_fwdbwd']:+.1%}",
                 f"{r['overhead_torch_fwd']:+.1%}", f"{r['overhead_torch_fwdbwd']:+.1%}",
                 f"{r['speedup_vs_torch_fwd']:.2f}x", f"{r['speedup_vs_torch_fwdbwd']:.2f}x",
                 f"{r['roofline_fraction_fwd']:.0%}", f"{r['roofline_fraction_fwdbwd']:.0%}"]
        print("| " + " | ".join(cells) + " |")
    print("ovh: adapter time / base linear time (same phase); x torch: adapter speed-up over the torch path; "
          "roofline: ideal adapter time / measured adapter time.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of --dtype (H100 SXM bf16: 989)")
    p.add_argument("--peak-tbps", type=float, default=3.35, help="memory bandwidth in TB/s (H100 SXM: 3.35)")
    p.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement (triton do_bench)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", help="also write the JSON results to this file")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: run the script under Triton's interpreter at tiny shapes (a test of the script)")
    args = p.parse_args(argv)

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    elif not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU: none is visible to torch (for CPU numbers see "
                 "benchmarks/bench_torch_paths.py)")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter is for CPU tests, not for timing")
    from moelora.kernels.rank_activation import rank_activation_triton
    from moelora.ops import rank_activation_torch

    torch.manual_seed(0)
    rows = [run_pattern(name, args, rank_activation_triton, rank_activation_torch) for name in args.patterns]
    result = json.dumps({"device": device_name(), "args": vars(args), "results": rows}, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(result)
    if args.json:
        print(result)
    else:
        print_table(rows, args)


if __name__ == "__main__":
    main()
