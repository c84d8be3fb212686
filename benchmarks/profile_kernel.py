"""Where the rank-activation op's time goes on a GPU: kernel time per launch vs wall time per call.

    python benchmarks/profile_kernel.py                     # bench_kernel.py's shape: d=4096, 8192 tokens, bf16
    python benchmarks/profile_kernel.py --d 576 --tokens 4096   # a SmolLM2-135M projection

For each routing pattern and path (triton, torch), one forward+backward of the adapter alone (base output
given) is run --iters times under torch.profiler. Printed per path: wall ms per call (the CPU's pace when
the GPU waits for launches), summed GPU kernel ms per call, and the number of kernel launches per call; then
the kernels that take the most GPU time. Wall time well above kernel time means launch overhead binds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernel import DTYPES, PATTERNS, add_shape_args, make_inputs  # noqa: E402


def profile(step, iters: int):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    gpu_ms = sum(e.device_time_total for e in kernels) / 1e3 / iters
    launches = sum(e.count for e in kernels) / iters
    top = sorted(kernels, key=lambda e: -e.device_time_total)[:8]
    return wall_ms, gpu_ms, launches, [(e.key[:70], e.device_time_total / 1e3 / iters, e.count / iters) for e in top]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_kernel.py needs a CUDA GPU")
    from moelora.kernels.rank_activation import rank_activation_triton
    from moelora.ops import rank_activation_torch

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    print(f"# {torch.cuda.get_device_name()}, {args.tokens} tokens, d={args.d}, {args.dtype}: adapter fwd+bwd per call")
    for pattern in args.patterns:
        inp = make_inputs(pattern, args.tokens, args.d, dtype, "cuda")
        x, A, B, gates = (inp[k].requires_grad_() for k in ("x", "A", "B", "gates"))
        out = torch.randn(args.tokens, args.d, device="cuda", dtype=dtype)
        dy = torch.randn_like(out)
        for label, op in (("triton", rank_activation_triton), ("torch", rank_activation_torch)):
            def step(op=op):
                for t in (x, A, B, gates):
                    t.grad = None
                op(x, A, B, inp["idx_a"], inp["idx_b"], gates, 2.0, inp["block"], out=out).backward(dy)

            wall, gpu, launches, top = profile(step, args.iters)
            print(f"{pattern:24s} {label:6s} wall {wall:.3f} ms  kernels {gpu:.3f} ms  launches {launches:.0f}")
            for name, ms, count in top:
                print(f"    {ms:.3f} ms  x{count:.0f}  {name}")


if __name__ == "__main__":
    main()
