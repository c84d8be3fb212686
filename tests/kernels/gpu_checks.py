"""Checks that need a CUDA GPU: the compiled Triton kernels (not the interpreter) against the torch path.

    python -m tests.kernels.gpu_checks op        # every routing pattern, fp32/fp16/bf16, all gradients
    python -m tests.kernels.gpu_checks compile   # torch.compile (Inductor, and CUDA graphs) through the op
    python -m tests.kernels.gpu_checks methods   # every registered method: triton vs torch backend
    python -m tests.kernels.gpu_checks --cpu-smoke op compile methods   # the same code, tiny, on CPU

Run from the repository root without TRITON_INTERPRET. `test_rank_activation_triton.py` runs op and methods in
a subprocess when a GPU is visible (its folder's conftest turns the interpreter on for everything else);
benchmarks/gpu_check.sh runs all three. --cpu-smoke runs them under the interpreter on CPU at tiny shapes
(a few patterns, compile with the aot_eager backend), to test this script without a GPU.
Prints one line per check and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

# (n, d_in, d_out): off the tile grid, and one at a real model's width with several token tiles.
SHAPES = [(1000, 300, 520), (4099, 1024, 1024)]
DEVICE = "cuda"
SMOKE = False  # --cpu-smoke: interpreter on CPU, tiny shapes, a few patterns


def _smoke():
    """--cpu-smoke: on CPU under the interpreter, few patterns and dtypes, tiny shapes."""
    global SHAPES, DEVICE, SMOKE
    SHAPES, DEVICE, SMOKE = [(40, 24, 20)], "cpu", True
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (the checks import it lazily)


def check_op() -> None:
    from moelora.kernels import plans  # the split count is looked up there
    from moelora.kernels.rank_activation import INTERPRET, rank_activation_triton
    from moelora.ops import rank_activation_torch
    from tests.kernels.cases import PATTERNS, TOL, assert_match, make_case, run

    assert INTERPRET == SMOKE, "unset TRITON_INTERPRET: these checks are for the compiled kernels"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 compared tightly: no TF32 on either side
    patterns = ["smora_r64_k8", "mixlora_sep"] if SMOKE else list(PATTERNS)
    dtypes = (torch.bfloat16,) if SMOKE else (torch.float32, torch.float16, torch.bfloat16)
    natural = plans._split_count
    # The shapes here split only the token reductions; the first shape runs again with every reduction split
    # in 3 (as at d=4096), so the kernels' split paths (partials summed by their consumers) run compiled too.
    for (n, d_in, d_out), forced in [(SHAPES[0], 3)] * (not SMOKE) + [(shape, None) for shape in SHAPES]:
        plans._split_count = natural if forced is None else (lambda device, grid_mn, k_tiles, s=forced: s)
        plans._gemm_plan_cached.cache_clear()
        for pattern in patterns:
            for dtype in dtypes:
                case = make_case(pattern, n=n, d_in=d_in, d_out=d_out, dtype=dtype, seed=n, with_out=True,
                                 device=DEVICE)
                got = run(rank_activation_triton, case)
                # Reference: the torch path in fp32 on the same (rounded) inputs.
                case32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                          for k, v in case.items()}
                tol = TOL[dtype] if dtype != torch.float32 else (1e-4, 1e-4)  # fp32: summation order only
                assert_match(got, run(rank_activation_torch, case32), tol, f"{pattern} {dtype} n={n} split={forced}")
                print(f"ok op {pattern:20s} {str(dtype):15s} n={n} d={d_in}->{d_out}"
                      f"{f', every reduction split {forced} ways' if forced else ''}", flush=True)
    plans._split_count = natural
    plans._gemm_plan_cached.cache_clear()
    # A caller-supplied h (LoRA-Mixer and X-LoRA stack A with the router GEMM): gradients reach h.
    for pattern in ("experts_8x16_top2",) if SMOKE else ("experts_8x16_top2", "smora_r64_k8"):
        n, d_in, d_out = (40, 30, 20) if SMOKE else (777, 256, 384)
        case = make_case(pattern, n=n, d_in=d_in, d_out=d_out, device=DEVICE)
        res = []
        for fn in (rank_activation_triton, rank_activation_torch):
            x, A = case["x"].clone().requires_grad_(), case["A"].clone().requires_grad_()
            y = fn(x, A, case["B"], case["idx_a"], case["idx_b"], case["gates"], case["scaling"], case["block"],
                   h=x @ A.t())
            y.backward(torch.ones_like(y))
            res.append({"y": y.detach(), "dx": x.grad, "dA": A.grad})
        assert_match(res[0], res[1], (1e-4, 1e-4), f"{pattern} with h")
        print(f"ok op {pattern} with a caller's h", flush=True)


def check_compile() -> None:
    """torch.compile(fullgraph=True) of an adapted layer's forward+backward through the op: no graph break,
    the Triton kernels visible to Inductor (they appear in its generated code), eager-equal results; then the
    same step under mode="reduce-overhead" (CUDA graphs), reporting whether the graphs were captured."""
    from torch._dynamo.utils import counters

    from moelora.kernels.rank_activation import rank_activation_triton
    from tests.kernels.cases import TOL, assert_match, make_case

    dtype = torch.float32 if SMOKE else torch.bfloat16
    backend = "aot_eager" if SMOKE else "inductor"
    n, d = (48, 32) if SMOKE else (2048, 1024)
    patterns = ["mixlora_sep"] if SMOKE else ["smora_r64_k8", "mixlora_sep", "experts_8x16_dense"]
    for pattern in patterns:
        case = make_case(pattern, n=n, d_in=d, d_out=d, dtype=dtype, seed=3, device=DEVICE)
        W = (torch.randn(d, d, generator=torch.Generator().manual_seed(4)) / d**0.5).to(DEVICE, dtype)

        def step(x, A, B, gates):
            y = rank_activation_triton(x, A, B, case["idx_a"], case["idx_b"], gates, case["scaling"], case["block"],
                                       out=x @ W.t())
            return y.float().square().mean()

        leaves = [case[k] for k in ("x", "A", "B", "gates")]

        def grads(fn, repeats=1):
            for _ in range(repeats):
                t = [v.detach().clone().requires_grad_() for v in leaves]
                loss = fn(*t)
                loss.backward()
            return {"loss": loss.detach(), **{f"d{i}": v.grad for i, v in enumerate(t)}}

        explain = torch._dynamo.explain(step)(*leaves)
        assert explain.graph_break_count == 0, (pattern, explain.break_reasons)
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        tol = (1e-5, 1e-5) if dtype == torch.float32 else TOL[dtype]
        seen = ""
        if SMOKE:
            got = grads(compiled)
        else:  # one Inductor compile: its generated code must launch our kernels itself (triton_op is visible)
            from torch._inductor.utils import run_and_get_code

            got, code = run_and_get_code(grads, compiled)
            found = [k for k in ("_matmul_kernel", "_routing_kernel", "_sum_slices_kernel") if any(k in c for c in code)]
            assert "_matmul_kernel" in found, f"{pattern}: Inductor's code does not launch the Triton kernels"
            seen = f", Inductor launches {found}"
        assert_match(got, grads(step), tol, f"{pattern} compiled ({backend})")
        print(f"ok compile {pattern:20s} {str(dtype):15s} 0 graph breaks, matches eager{seen}", flush=True)
        if not SMOKE and pattern == patterns[0]:  # CUDA graphs: one pattern (each compile costs seconds)
            torch._dynamo.reset()
            counters.clear()
            graphed = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            assert_match(grads(graphed, repeats=3), grads(step), tol, f"{pattern} reduce-overhead")
            skips = counters["inductor"]["cudagraph_skips"]  # the reason: TORCH_LOGS=perf_hints
            print(f"{'ok' if not skips else 'NOT CAPTURED'} cudagraphs {pattern:20s} matches eager after 3 replays; "
                  f"cudagraph skips: {skips}", flush=True)


def check_methods() -> None:
    """Loss and every adapter gradient of each method on a tiny Llama on the GPU: triton == torch."""
    import moelora
    from moelora.base_models import build_tiny_tokenizer, resolve_base_model
    from tests.conftest import randomize_adapters
    from tests.test_method_matrix import METHOD_CASES, ROW_INPUTS

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    text = {"input_ids": torch.randint(3, 300, (4, 40), generator=gen),
            "attention_mask": torch.ones(4, 40, dtype=torch.long)}
    methods = ["smora"] if SMOKE else list(METHOD_CASES)
    for name in methods:
        fields = METHOD_CASES[name]
        base, _ = resolve_base_model("tiny-random-llama")
        torch.manual_seed(0)
        model = moelora.get_moelora_model(base, {"name": name, **fields})
        randomize_adapters(model)
        model.to(DEVICE).train()
        row = ROW_INPUTS.get(name)
        batch = row["batch"](model, build_tiny_tokenizer()) if row else dict(text)
        batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
        results = {}
        for backend in ("torch", "triton"):
            os.environ["MOELORA_BACKEND"] = backend
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same dropout masks (X-LoRA) for both backends
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None})
        os.environ.pop("MOELORA_BACKEND")
        (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
        assert grads_t.keys() == grads_k.keys() and grads_t, name
        assert abs(loss_t - loss_k) <= 1e-4 * max(1.0, abs(loss_t)), (name, loss_t, loss_k)
        worst = max(((grads_k[n] - g).abs().max() / g.abs().max().clamp_min(1e-6)).item() for n, g in grads_t.items())
        assert worst < 1e-3, (name, worst)
        print(f"ok method {name:12s} loss {loss_t:.5f} vs {loss_k:.5f}, worst relative grad diff {worst:.1e}",
              flush=True)


CHECKS = {"op": check_op, "compile": check_compile, "methods": check_methods}

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--cpu-smoke" in args:
        args.remove("--cpu-smoke")
        _smoke()
    elif not torch.cuda.is_available():
        sys.exit("tests/kernels/gpu_checks.py needs a CUDA GPU (or --cpu-smoke)")
    unknown = [a for a in args if a not in CHECKS]
    if unknown:
        sys.exit(f"tests/kernels/gpu_checks.py: unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    for item in args or ["op", "methods"]:
        CHECKS[item]()
    print("all GPU checks passed" if not SMOKE else "all checks passed (CPU smoke: interpreter, tiny shapes)")
