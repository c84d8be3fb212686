"""Kernel launches per adapted layer on the Triton path: forward and backward, for every routing pattern (CPU).

    python benchmarks/count_launches.py            # table of launches per layer call, both GPU regimes
    python benchmarks/count_launches.py --json

A training step on a GPU is bound by launches (benchmarks/RESULTS.md §5), and launches can be counted
without a GPU: the op runs under Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
imported), every Triton launch is counted by patching the interpreter's launch, and every torch op of the
op that runs a kernel (sums, casts, copies, fills; not views or allocations) by a TorchDispatchMode. The
result is checked against the torch path, so a count comes from a correct run.

How many launches a call makes depends on which reductions are split into slices (split-K), which on a
GPU depends on the shape: a split pays off only for long reductions. Two regimes are counted, each
forced through `_split_count` on a small interpreter shape (256 tokens, d=128; tokens reduce over 4
tiles, features over 2):
    short  a SmolLM2-135M layer (d=576): the feature reductions are short (not split), the weight
           gradients' token reductions are long (split)
    long   a Llama-3-8B layer (d=4096) or the d=4096 x 8192 benchmark: every splittable reduction is split
The rows are the calls the methods' layers make (moelora/methods/*), plus the kernel tests' extra patterns.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is first imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# (E, block, k, routing, h given): how each method's layer calls the op; routing as in tests/kernels/cases.py
# (same | sep | dense | modality), plus "lora" (no gates). SMoRA hands in h (its router GEMM is stacked with A).
LAYERS = {
    "lora (r=64, no gates)": (64, 1, None, "lora", False),
    "smora (R=64, k=8, h given)": (64, 1, 8, "same", True),
    "lora_mixer (4 x r16, top-2)": (4, 16, 2, "same", False),
    "xlora (4 x r8, dense)": (4, 8, None, "dense", False),
    "mixlora (16 x r1, k=4, sep)": (16, 1, 4, "sep", False),
    "modality (2 x r16, k=1)": (2, 16, 1, "modality", False),
    "experts 8 x r16 top-2": (8, 16, 2, "same", False),
    "experts 8 x r16 dense": (8, 16, None, "dense", False),
}
REGIMES = {  # k_tiles -> slices: tokens reduce over 4 tiles at this shape, features over 2
    "short": lambda device, grid_mn, k_tiles: 2 if k_tiles >= 3 else 1,
    "long": lambda device, grid_mn, k_tiles: 2 if k_tiles >= 2 else 1,
}
N_TOKENS, D = 256, 128

# aten ops that launch no kernel: views, metadata and allocations
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
              "t", "transpose", "as_strided", "expand", "select", "slice", "detach", "alias", "unsqueeze",
              "squeeze", "permute", "split", "split_with_sizes", "unbind", "reshape", "lift_fresh", "_reshape_alias",
              "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
# The index range check, which reads the indices on the host only for CPU tensors (never on a GPU)
_CPU_ONLY = {"minimum", "maximum", "min", "max", "_local_scalar_dense"}


class Counter(TorchDispatchMode):
    """Counts Triton launches (by kernel name) and torch ops that run a kernel (by op name)."""

    def __init__(self):
        super().__init__()
        self.triton: collections.Counter = collections.Counter()
        self.torch: collections.Counter = collections.Counter()
        self.in_launch = False  # the interpreter's own tensor copies are not the op's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "moelora":  # our operator: count what its implementation runs, not the op
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if not self.in_launch and name not in _NO_KERNEL and name not in _CPU_ONLY:
            self.torch[name] += 1
        return func(*args, **kwargs)


def install_launch_counter(counter_ref: list) -> None:
    """Patch the interpreter's launch so every kernel[grid](...) is counted by the active Counter."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter = counter_ref[0]
        if counter is None:
            return original(self, *args, **kwargs)
        counter.triton[self.fn.__name__] += 1
        counter.in_launch = True
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_launch = False

    InterpretedFunction.run = run


def make_inputs(e, block, k, routing, dtype, seed=0):
    from tests.kernels.cases import make_case

    pattern = (e, block, k, "dense" if routing == "lora" else routing)
    case = make_case(pattern, n=N_TOKENS, d_in=D, d_out=D, dtype=dtype, seed=seed, with_out=True)
    if routing == "lora":
        case["gates"] = None
        case["idx_a"] = case["idx_b"] = None
    return case


def count(name, regime, dtype, ra, counter_ref):
    """{'fwd': Counter, 'bwd': Counter} for one layer call, after checking it against the torch path."""
    from moelora.ops import rank_activation_torch
    from tests.kernels.cases import TOL

    e, block, k, routing, h_given = LAYERS[name]
    case = make_inputs(e, block, k, routing, dtype)
    from moelora.kernels import plans  # the launch plans look the split count up there

    plans._split_count = REGIMES[regime]
    plans._gemm_plan_cached.cache_clear()
    results = {}
    outputs = []
    for fn in (ra.rank_activation_triton, rank_activation_torch):
        x, A, B = (case[n].clone().requires_grad_() for n in ("x", "A", "B"))
        gates = case["gates"].clone().requires_grad_() if case["gates"] is not None else None
        out = case["out"]  # the base output (its gradient, dy itself, costs nothing)
        counting = fn is ra.rank_activation_triton
        # SMoRA's h is the second half of its [router | A] GEMM's output (a strided view); that GEMM is the
        # caller's, so its output is a leaf here and its backward is not counted as the op's.
        h = None
        if h_given:
            r = A.shape[0]
            h = torch.empty_strided((N_TOKENS, r), (2 * r, 1), dtype=dtype).copy_(x.detach() @ A.detach().t())
            h.requires_grad_()
        fwd, bwd = Counter(), Counter()
        counter_ref[0] = fwd if counting else None
        with fwd if counting else torch.enable_grad():
            gates_arg = gates
            if gates is None and counting and not hasattr(ra, "UNGATED"):  # the old dispatcher's gate of ones
                gates_arg = x.new_ones(N_TOKENS, e)
            y = fn(x, A, B, case["idx_a"], case["idx_b"], gates_arg, case["scaling"], block, h=h, out=out)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        counter_ref[0] = bwd if counting else None
        with bwd if counting else torch.enable_grad():
            y.backward(dy)
        counter_ref[0] = None
        grads = [h.grad] if h_given else [x.grad, A.grad]
        outputs.append([y.detach(), B.grad] + grads + ([gates.grad] if gates is not None else []))
        if counting:
            results = {"fwd": fwd, "bwd": bwd}
    rtol, frac = (1e-4, 1e-4) if dtype == torch.float32 else TOL[dtype]
    for got, ref in zip(*outputs):
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=frac * max(1.0, ref.abs().max().item()),
                                   msg=lambda m: f"{name} {regime}: {m}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="of x, A, B (bf16, as on a GPU: the casts of the weight gradients count)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from moelora.kernels import rank_activation as ra

    assert ra.INTERPRET
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    counter_ref = [None]
    install_launch_counter(counter_ref)
    rows = []
    for regime in args.regimes:
        for name in args.layers:
            c = count(name, regime, dtype, ra, counter_ref)
            rows.append({"layer": name, "regime": regime, "dtype": args.dtype,
                         **{f"{ph}_{kind}": dict(getattr(c[ph], kind)) for ph in ("fwd", "bwd")
                            for kind in ("triton", "torch")}})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# Triton path, launches per adapted-layer call (interpreter, {args.dtype}, {N_TOKENS} tokens, d={D}; "
          "short/long: which reductions are split, see the docstring)")
    print("| layer call | regime | fwd Triton | fwd torch | bwd Triton | bwd torch | total |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        n = {k: sum(r[k].values()) for k in ("fwd_triton", "fwd_torch", "bwd_triton", "bwd_torch")}
        print(f"| {r['layer']} | {r['regime']} | {n['fwd_triton']} | {n['fwd_torch']} | {n['bwd_triton']} | "
              f"{n['bwd_torch']} | {sum(n.values())} |")
    print("torch: ops that run a kernel (sum, cast, copy, fill), counted by a TorchDispatchMode; detail: --json")


if __name__ == "__main__":
    main()
