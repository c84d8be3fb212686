"""The Triton rank-activation op against the torch path and the token loop, under TRITON_INTERPRET.

Every routing pattern the methods use, forward and all gradients (x, A, B, gates, out, h), fp32
tight and fp16/bf16 loose, shapes that are not multiples of the tiles. The interpreter costs
~7 ms per program x loop trip, so shapes stay small. The GPU launch configuration, which the
interpreter never sees, is checked by compiling every launch for sm_90 ahead of time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moelora.kernels import launchers
from moelora.kernels import rank_activation as ra
from moelora.kernels.rank_activation import GPU_TILES, rank_activation_triton
from moelora.ops import rank_activation_loop, rank_activation_torch

from tests.kernels.cases import PATTERNS, TOL, assert_match, make_case, run

assert ra.INTERPRET, "tests/kernels/conftest.py must set TRITON_INTERPRET before the kernel import"


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_fp32_matches_torch_and_loop(pattern):
    case = make_case(pattern, with_out=pattern.startswith("experts"))
    got = run(rank_activation_triton, case)
    assert_match(got, run(rank_activation_torch, case), torch.float32, f"{pattern} vs torch")
    assert_match(got, run(rank_activation_loop, case), torch.float32, f"{pattern} vs loop")


@pytest.mark.parametrize("pattern", ["smora_r64_k8", "experts_8x16_top2", "experts_8x16_dense", "mixlora_sep",
                                     "modality_k1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_fp32_reference(pattern, dtype):
    """Half inputs: compare with the torch path on the same (rounded) values in fp32, loosely.
    (bf16 runs here only because the kernels cast every load to fp32 under the interpreter.)"""
    case = make_case(pattern, n=53, d_in=70, d_out=50, dtype=dtype, seed=1, with_out=True)
    got = run(rank_activation_triton, case)
    case32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    ref = run(rank_activation_torch, case32)
    assert got["y"].dtype == dtype and got["dA"].dtype == dtype and got["dgates"].dtype == torch.float32
    assert_match(got, ref, dtype, f"{pattern} {dtype}")


@pytest.mark.parametrize("k", range(1, 8))
def test_every_k_from_1_to_E_with_blocks_straddling_rank_tiles(k):
    """E=7 blocks of 12 ranks: block 5 (ranks 60..71) straddles the 64-rank tile, so routing and the
    gate gradient are assembled from two tiles."""
    for routing in ("same", "sep") if k in (1, 3, 7) else ("same",):
        case = make_case((7, 12, k, routing), n=45, d_in=30, d_out=37, seed=k)
        assert_match(run(rank_activation_triton, case), run(rank_activation_loop, case), torch.float32,
                     f"k={k} {routing}")


def test_dense_over_more_blocks_than_one_gate_tile():
    case = make_case((80, 1, None, "dense"), n=30, d_in=20, d_out=24)  # 80 gates > 64 per tile
    assert_match(run(rank_activation_triton, case), run(rank_activation_loop, case), torch.float32, "E=80")


def test_unselected_block_gets_exactly_zero_grads():
    case = make_case("experts_8x16_top2", n=40)
    idx = case["idx_a"]
    idx[idx == 3] = 5  # nobody selects expert 3 (5 may now repeat in a row: duplicates must sum)
    got = run(rank_activation_triton, case)
    assert torch.count_nonzero(got["dA"][48:64]) == 0 and torch.count_nonzero(got["dB"][:, 48:64]) == 0
    assert_match(got, run(rank_activation_loop, case), torch.float32, "empty expert")


def test_every_token_routed_to_one_block():
    case = make_case((6, 16, 1, "same"), n=70, d_in=33, d_out=40)
    case["idx_a"] = case["idx_b"] = torch.full((70, 1), 2)
    got = run(rank_activation_triton, case)
    assert torch.count_nonzero(got["dA"][:32]) == 0 and torch.count_nonzero(got["dA"][48:]) == 0
    assert_match(got, run(rank_activation_loop, case), torch.float32, "one block")


def test_all_slots_empty_gives_out_and_zero_grads():
    case = make_case("modality_k1", n=20, with_out=True)
    case["idx_a"] = case["idx_b"] = torch.full((20, 1), -1)
    got = run(rank_activation_triton, case)
    torch.testing.assert_close(got["y"], case["out"])
    for name in ("dx", "dA", "dB", "dgates"):
        assert torch.count_nonzero(got[name]) == 0, name
    torch.testing.assert_close(got["dout"], torch.randn(20, 83, generator=torch.Generator().manual_seed(123)))


def test_equal_but_distinct_index_tensors_take_the_general_path():
    case = make_case("experts_8x16_top2", n=30)
    case["idx_b"] = case["idx_a"].clone()
    assert_match(run(rank_activation_triton, case), run(rank_activation_torch, case), torch.float32, "sep==same")


def test_out_is_added_and_receives_the_upstream_gradient():
    case = make_case("smora_r64_k8", n=30, with_out=True)
    got = run(rank_activation_triton, case)
    delta = rank_activation_triton(case["x"], case["A"], case["B"], case["idx_a"], case["idx_b"], case["gates"],
                                   case["scaling"], case["block"])
    torch.testing.assert_close(got["y"], case["out"] + delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["dout"], torch.randn(30, 83, generator=torch.Generator().manual_seed(123)))
    assert not case["out"].requires_grad  # a frozen base output (no grad) is fine too
    run(rank_activation_triton, case, grad_out=False)


@pytest.mark.parametrize("pattern", ["smora_r64_k8", "mixlora_sep", "experts_8x16_dense"])
def test_precomputed_h_routes_gradients_through_the_callers_graph(pattern):
    """h given: the op uses it and differentiates w.r.t. h, as the torch path does, so x and A get
    their gradients through the caller's h = x A^T (e.g. a router GEMM stacked with A)."""
    case = make_case(pattern, n=41)
    results = []
    for fn in (rank_activation_triton, rank_activation_torch):
        x, A, B, g = (case[n].clone().requires_grad_() for n in ("x", "A", "B", "gates"))
        h = x @ A.t()
        y = fn(x, A, B, case["idx_a"], case["idx_b"], g, case["scaling"], case["block"], h=h)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
        results.append({"y": y.detach(), "dx": x.grad, "dA": A.grad, "dB": B.grad, "dgates": g.grad})
    assert_match(*results, torch.float32, f"h given {pattern}")


def test_only_some_inputs_need_grad():
    """Frozen experts (X-LoRA: only x and the gates train) and a frozen router (only A and B)."""
    case = make_case("experts_8x16_dense", n=30)
    for trainable in (("x", "gates"), ("A", "B")):
        grads = []
        for fn in (rank_activation_triton, rank_activation_torch):
            t = {n: case[n].clone().requires_grad_(n in trainable) for n in ("x", "A", "B", "gates")}
            fn(t["x"], t["A"], t["B"], None, None, t["gates"], 0.7, 16).square().sum().backward()
            assert all((t[n].grad is None) == (n not in trainable) for n in t)
            grads.append({n: t[n].grad for n in trainable})
        assert_match(*grads, torch.float32, f"trainable {trainable}")


def test_noncontiguous_inputs():
    case = make_case("experts_8x16_top2", n=37, d_in=45, d_out=50)
    ref = run(rank_activation_torch, case)
    case["x"] = case["x"].t().contiguous().t()  # same values, column-major
    case["B"] = case["B"].t().contiguous().t()
    assert not case["x"].is_contiguous()
    assert_match(run(rank_activation_triton, case), ref, torch.float32, "non-contiguous")


def test_backward_is_bitwise_deterministic():
    case = make_case("mixlora_sep", n=97, d_in=70, d_out=90)
    first, second = run(rank_activation_triton, case), run(rank_activation_triton, case)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_split_reduction_matches_torch():
    """Weight gradients reduce over tokens in slices summed by torch (no atomics): check the split."""
    a, b = torch.randn(300, 40), torch.randn(300, 70)
    t = ra.tiles_for("grad_a")
    got = launchers._matmul(a.t(), b, alpha=0.5, tiles=t, split=True)  # 5 slices of 64 tokens
    torch.testing.assert_close(got, 0.5 * a.t() @ b, rtol=1e-5, atol=1e-4)


def test_zero_tokens():
    case = make_case("smora_r64_k8", n=0, with_out=True)
    got = run(rank_activation_triton, case)
    assert got["y"].shape == (0, 83) and got["dA"].abs().sum() == 0 and got["dB"].abs().sum() == 0


def test_dispatch_through_moelora_ops(monkeypatch):
    import moelora.ops as ops

    monkeypatch.setenv("MOELORA_BACKEND", "triton")
    case = make_case("mixlora_sep", n=25)
    assert ops.backend_for(case["x"]) == "triton"
    got = ops.rank_activation(case["x"], case["A"], case["B"], case["idx_a"], case["idx_b"], case["gates"], 0.7, 1)
    ref = rank_activation_torch(case["x"], case["A"], case["B"], case["idx_a"], case["idx_b"], case["gates"], 0.7, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(idx_b=None), "both idx_a and idx_b"),
    (dict(block=5), "must divide"),
    (dict(A=torch.randn(64, 45, dtype=torch.float16)), "share one of"),
    (dict(gates=torch.rand(67, 3)), "gates must match"),
    (dict(idx_a=torch.full((67, 8), 64)), r"\[-1, 64\)"),
    (dict(x=torch.randn(2, 67, 45)), "2-D"),
    (dict(out=torch.randn(67, 82)), "out must be"),
])
def test_unsupported_inputs_raise_clear_errors(change, message):
    case = {**make_case("smora_r64_k8"), **change}
    if "idx_a" in change:
        case["idx_b"] = case["idx_a"]
    with pytest.raises(ValueError, match=message):
        rank_activation_triton(case["x"], case["A"], case["B"], case["idx_a"], case["idx_b"], case["gates"],
                               0.7, case["block"], out=case["out"])


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(ra, "INTERPRET", False)
    case = make_case("smora_k1", n=4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rank_activation_triton(case["x"], case["A"], case["B"], case["idx_a"], case["idx_b"], case["gates"], 1.0)


def test_gpu_tiles_are_at_least_16_in_every_dot_dimension():
    """The interpreter accepts tl.dot tiles < 16 that the GPU compiler rejects: check the GPU table."""
    assert set(GPU_TILES) == set(ra.INTERPRET_TILES)
    for name, t in GPU_TILES.items():
        if name in ("routing", "sum"):  # no tl.dot: element tiles only
            assert t.block_m & (t.block_m - 1) == 0, (name, t)
            continue
        for dim in (t.block_m, t.block_n, t.block_k):
            assert dim >= 16 and dim & (dim - 1) == 0, (name, t)
    assert ra.tiles_for("expand", interpret=False) is GPU_TILES["expand"]


_AOT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moelora.kernels import launchers, plans
from moelora.kernels import rank_activation as ra
assert not ra.INTERPRET
calls = []
launchers._launch = lambda kernel, grid, *args, **kw: calls.append((kernel, args, kw))  # record instead of running
ra._check = lambda *args: None  # CPU tensors without the interpreter are refused otherwise
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}
def source(fn, args, kw):  # the signature the JIT would build: 1 -> constexpr, multiples of 16 aligned
    sig, consts, attrs = {}, {}, {}
    for i, (p, a) in enumerate(zip(fn.params, args)):
        if torch.is_tensor(a):
            sig[p.name] = PTR[a.dtype]; attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool) or (isinstance(a, int) and a == 1):
            sig[p.name] = "constexpr"; consts[p.name] = a
        elif isinstance(a, int):
            sig[p.name] = "i32"
            if a % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32"
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages")}
    for k, v in kw.items():
        sig[k] = "constexpr"; consts[k] = v
    return ASTSource(fn, {p.name: sig[p.name] for p in fn.params}, consts, attrs), opts
n, d = 256, 128
for dtype in (torch.bfloat16, torch.float32):
    for split in (True, False):  # unsplit: the shrink's routing epilogue; split: the partial sums
        plans._split_count = (lambda device, grid_mn, k_tiles: 2) if split else (lambda device, grid_mn, k_tiles: 1)
        plans._gemm_plan_cached.cache_clear()
        for e, b, k, sep in ((64, 1, 8, False), (8, 16, 2, True), (8, 16, 0, False), (4, 16, None, False)):
            x, A, B = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((n, d), (e * b, d), (d, e * b)))
            ia = torch.randint(0, e, (n, k)) if k else None
            ib = torch.randint(0, e, (n, k)) if sep else ia
            g = torch.rand(n, k or e, requires_grad=True) if k is not None else None  # k None: plain LoRA
            ra.rank_activation_triton(x, A, B, ia, ib, g, 2.0, b, out=torch.randn(n, d, dtype=dtype)).sum().backward()
done = {}
for fn, args, kw in calls:
    src, opts = source(fn, args, dict(kw))
    if src.hash() not in done:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        done[src.hash()] = kernel.metadata.shared
        assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kw, kernel.metadata.shared)
print(f"compiled {len(done)} launches for sm_90, max shared memory {max(done.values())} B")
'''


def test_gpu_launches_compile_for_sm90():
    """Compile every kernel launch the GPU configuration makes (bf16, fp32; all routing modes) for an
    H100 ahead of time, without a GPU: catches tl.dot < 16, type errors in constexpr branches that
    the interpreter never builds, and shared memory over the 227 KiB a block may use."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels, not the interpreter)")
@pytest.mark.parametrize("what", ["op", "methods"])
def test_compiled_kernels_on_gpu(what):
    """tests/kernels/gpu_checks.py: every pattern and dtype, then every method, compiled Triton vs torch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_checks", what], env=env, cwd=root,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all GPU checks passed" in proc.stdout
