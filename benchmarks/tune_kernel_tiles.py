"""Choose `GPU_TILES` of moelora/kernels/rank_activation.py on the GPU at hand, by coordinate descent.

    python benchmarks/tune_kernel_tiles.py                    # d=4096, 8192 tokens, bf16 (bench_kernel's shape)
    python benchmarks/tune_kernel_tiles.py --rounds 2 --json tiles.json

For each launch in GPU_TILES in turn, every candidate below is timed with the other launches held at the best
found so far; the one with the least forward+backward time of the op, summed over the routing patterns, is
kept. The script prints each candidate's time and, at the end, the table to paste into GPU_TILES. Candidates
that fail to compile (too much shared memory) are skipped. Needs a CUDA GPU, like bench_kernel.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernel import DTYPES, PATTERNS, add_shape_args, bench, make_inputs  # noqa: E402

# (block_m, block_n, block_k, num_warps, num_stages); every tl.dot dimension >= 16.
CANDIDATES = {
    # H = x A^T and dH_g = s dY B: tokens x ranks, reduced over d (split)
    "shrink": [(128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (32, 64, 128, 4, 4)],
    "grad_hg": [(128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (32, 64, 128, 4, 4)],
    # y = out + s route(H) B^T and dX = dH A: tokens x d, reduced over the ranks
    "expand": [(128, 128, 64, 8, 2), (128, 128, 32, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 2),
               (64, 256, 64, 8, 3), (128, 64, 64, 4, 3)],
    "grad_x": [(128, 128, 64, 8, 2), (128, 128, 32, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 2),
               (64, 256, 64, 8, 3), (128, 64, 64, 4, 3)],
    # dA = dH^T x (ranks x d) and dB = s dY^T H_g (d x ranks), reduced over tokens (split)
    "grad_a": [(64, 128, 64, 4, 3), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (64, 64, 128, 4, 4),
               (128, 128, 64, 8, 3)],
    "grad_b": [(128, 64, 64, 4, 3), (128, 64, 128, 8, 3), (256, 64, 64, 8, 3), (64, 64, 128, 4, 4),
               (128, 128, 64, 8, 3)],
    # H_g, dH and dg, no dot: tokens x ranks per program
    "routing": [(64, 64, 64, 4, 1), (32, 64, 64, 4, 1), (128, 64, 64, 8, 1), (64, 128, 64, 4, 1), (16, 64, 64, 2, 1)],
}


def total_ms(args, ra, inputs) -> float:
    """Forward+backward of the op alone (base output given), summed over the patterns."""
    total = 0.0
    for inp in inputs:
        x, A, B, gates = (inp[k] for k in ("x", "A", "B", "gates"))

        def step():
            y = ra.rank_activation_triton(x, A, B, inp["idx_a"], inp["idx_b"], gates, 2.0, inp["block"],
                                          out=inp["out"])
            y.backward(inp["dy"])

        total += bench(step, [x, A, B, gates], args.rep_ms)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=1, help="passes over all launches")
    p.add_argument("--rep-ms", type=int, default=40)
    p.add_argument("--json", help="write the chosen tiles and every timing here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_kernel_tiles.py needs a CUDA GPU")
    from moelora.kernels import rank_activation as ra

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    inputs = []
    for pattern in args.patterns:
        inp = make_inputs(pattern, args.tokens, args.d, dtype, "cuda")
        for k in ("x", "A", "B", "gates"):
            inp[k].requires_grad_()
        inp["out"] = torch.randn(args.tokens, args.d, device="cuda", dtype=dtype)
        inp["dy"] = torch.randn(args.tokens, args.d, device="cuda", dtype=dtype)
        inputs.append(inp)

    start = total_ms(args, ra, inputs)
    print(f"start: {start:.3f} ms (fwd+bwd, {len(inputs)} patterns, {args.tokens} tokens, d={args.d}, {args.dtype})")
    log = []
    for rnd in range(args.rounds):
        for name, cands in CANDIDATES.items():
            best_t, best = None, ra.GPU_TILES[name]
            for cand in cands:
                ra.GPU_TILES[name] = ra.Tiles(*cand)
                try:
                    t = total_ms(args, ra, inputs)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: not a candidate here
                    print(f"  {name} {cand}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                log.append({"round": rnd, "launch": name, "tiles": cand, "ms": t})
                print(f"  {name} {cand}: {t:.3f} ms", flush=True)
                if best_t is None or t < best_t:
                    best_t, best = t, ra.GPU_TILES[name]
            ra.GPU_TILES[name] = best
            print(f"{name}: {best}", flush=True)
    end = total_ms(args, ra, inputs)
    print(f"end: {end:.3f} ms ({start / end:.2f}x the start)\nGPU_TILES = {{")
    for name, t in ra.GPU_TILES.items():
        print(f'    "{name}": Tiles({t.block_m}, {t.block_n}, {t.block_k}, {t.num_warps}, {t.num_stages}),')
    print("}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "args": vars(args), "start_ms": start, "end_ms": end,
            "tiles": {n: list(map(int, (t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages)))
                      for n, t in ra.GPU_TILES.items()},
            "log": log}, indent=1))


if __name__ == "__main__":
    main()
