"""Checks that need a CUDA GPU: the compiled Triton kernels (not the interpreter) against the torch path.

    python -m tests.kernels.gpu_checks op        # every routing pattern, fp32/fp16/bf16, all gradients
    python -m tests.kernels.gpu_checks methods   # every registered method: triton vs torch backend

Run from the repository root without TRITON_INTERPRET. `test_rank_activation_triton.py` runs both in a
subprocess when a GPU is visible (its folder's conftest turns the interpreter on for everything else).
Prints one line per check and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

# (n, d_in, d_out): off the tile grid, and one at a real model's width with several token tiles.
SHAPES = [(1000, 300, 520), (4099, 1024, 1024)]


def check_op() -> None:
    from moelora.kernels.rank_activation import INTERPRET, rank_activation_triton
    from moelora.ops import rank_activation_torch
    from tests.kernels.cases import PATTERNS, TOL, assert_match, make_case, run

    assert not INTERPRET, "unset TRITON_INTERPRET: these checks are for the compiled kernels"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 compared tightly: no TF32 on either side
    for (n, d_in, d_out) in SHAPES:
        for pattern in PATTERNS:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                case = make_case(pattern, n=n, d_in=d_in, d_out=d_out, dtype=dtype, seed=n, with_out=True,
                                 device="cuda")
                got = run(rank_activation_triton, case)
                # Reference: the torch path in fp32 on the same (rounded) inputs.
                case32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                          for k, v in case.items()}
                tol = TOL[dtype] if dtype != torch.float32 else (1e-4, 1e-4)  # fp32: summation order only
                assert_match(got, run(rank_activation_torch, case32), tol, f"{pattern} {dtype} n={n}")
                print(f"ok op {pattern:20s} {str(dtype):15s} n={n} d={d_in}->{d_out}", flush=True)
    # A caller-supplied h (LoRA-Mixer and X-LoRA stack A with the router GEMM): gradients reach h.
    for pattern in ("experts_8x16_top2", "smora_r64_k8"):
        case = make_case(pattern, n=777, d_in=256, d_out=384, device="cuda")
        res = []
        for fn in (rank_activation_triton, rank_activation_torch):
            x, A = case["x"].clone().requires_grad_(), case["A"].clone().requires_grad_()
            y = fn(x, A, case["B"], case["idx_a"], case["idx_b"], case["gates"], case["scaling"], case["block"],
                   h=x @ A.t())
            y.backward(torch.ones_like(y))
            res.append({"y": y.detach(), "dx": x.grad, "dA": A.grad})
        assert_match(res[0], res[1], (1e-4, 1e-4), f"{pattern} with h")
        print(f"ok op {pattern} with a caller's h", flush=True)


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
    for name, fields in METHOD_CASES.items():
        base, _ = resolve_base_model("tiny-random-llama")
        torch.manual_seed(0)
        model = moelora.get_moelora_model(base, {"name": name, **fields})
        randomize_adapters(model)
        model.cuda().train()
        row = ROW_INPUTS.get(name)
        batch = row["batch"](model, build_tiny_tokenizer()) if row else dict(text)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
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


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("tests/kernels/gpu_checks.py needs a CUDA GPU")
    what = sys.argv[1:] or ["op", "methods"]
    for item in what:
        {"op": check_op, "methods": check_methods}[item]()
    print("all GPU checks passed")
