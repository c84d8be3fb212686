"""The Triton path as a PyTorch operator, and its launches, under TRITON_INTERPRET.

- torch.library: opcheck on the forward and backward operators; torch.compile(fullgraph=True) of a
  forward+backward through the op (and through moelora.ops.rank_activation) with no graph break, equal
  to eager.
- Fewer launches: routing (and its backward) in the epilogues of the shrink and of the dH_g GEMM where it is
  elementwise, split-K partials summed by their consumer, both weight gradients' sums in one launch; every
  pattern checked with and without splits.
"""

from __future__ import annotations

import collections

import pytest
import torch

from moelora.kernels import launchers, plans
from moelora.kernels import rank_activation as ra
from moelora.kernels.rank_activation import rank_activation_triton
from moelora.ops import rank_activation_torch

from tests.kernels.cases import PATTERNS, TOL, assert_match, make_case, run

assert ra.INTERPRET, "tests/kernels/conftest.py must set TRITON_INTERPRET before the kernel import"


@pytest.fixture
def splits(monkeypatch):
    """Force how many slices every splittable reduction gets (1: none), as a GPU would for short or long ones."""
    def force(n):
        monkeypatch.setattr(plans, "_split_count", lambda device, grid_mn, k_tiles: n)
        plans._gemm_plan_cached.cache_clear()
    yield force
    plans._gemm_plan_cached.cache_clear()


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches by kernel name (and still runs them)."""
    counts = collections.Counter()
    real = launchers._launch

    def counting(kernel, grid, *args, **meta):
        counts[kernel.fn.__name__] += 1
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(launchers, "_launch", counting)
    return counts


def _lora_case(n=67, seed=0):
    case = make_case("experts_8x16_dense", n=n, seed=seed, with_out=True)
    case["gates"] = None  # plain LoRA: no routing
    return case


def _run_lora(fn, case):
    x, A, B = (case[n].clone().requires_grad_() for n in ("x", "A", "B"))
    y = fn(x, A, B, None, None, None, 0.7, 1, out=case["out"])
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return {"y": y.detach(), "dx": x.grad, "dA": A.grad, "dB": B.grad}


@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_pattern_with_and_without_split_reductions(pattern, n_splits, splits):
    """Unsplit: DENSE/SAME route in the shrink's epilogue. Split: the routing kernel sums the partials."""
    splits(n_splits)
    case = make_case(pattern, n=70, d_in=130, d_out=40, seed=n_splits, with_out=True)
    assert_match(run(rank_activation_triton, case), run(rank_activation_torch, case), torch.float32,
                 f"{pattern} splits={n_splits}")


@pytest.mark.parametrize("n_splits", [1, 2])
def test_plain_lora_without_gates(n_splits, splits):
    splits(n_splits)
    case = _lora_case()
    assert_match(_run_lora(rank_activation_triton, case), _run_lora(rank_activation_torch, case), torch.float32,
                 f"lora splits={n_splits}")


def test_plain_lora_bf16_and_a_callers_h(splits):
    splits(2)
    case = _lora_case()
    case16 = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    case32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case16.items()}
    assert_match(_run_lora(rank_activation_triton, case16), _run_lora(rank_activation_torch, case32), torch.bfloat16,
                 "lora bf16")
    results = []
    for fn in (rank_activation_triton, rank_activation_torch):
        x, A = case["x"].clone().requires_grad_(), case["A"].clone().requires_grad_()
        y = fn(x, A, case["B"], None, None, None, 0.7, 1, h=x @ A.t())
        y.sum().backward()
        results.append({"y": y.detach(), "dx": x.grad, "dA": A.grad})
    assert_match(*results, torch.float32, "lora with h")


@pytest.mark.parametrize("pattern, fwd, bwd", [
    ("smora_r64_k8", 2, 4),        # shrink + routing epilogue, expand | dH_g + routing epilogue, dB, dX, dA
    ("experts_8x16_dense", 2, 4),
    ("mixlora_sep", 3, 5),         # separate selections gather across rank tiles: a routing kernel each way
])
def test_launches_without_splits(pattern, fwd, bwd, splits, launches):
    splits(1)
    case = make_case(pattern, n=64, with_out=True)
    leaves = {n: case[n].clone().requires_grad_() for n in ("x", "A", "B", "gates")}
    y = rank_activation_triton(leaves["x"], leaves["A"], leaves["B"], case["idx_a"], case["idx_b"], leaves["gates"],
                               0.7, case["block"], out=case["out"])
    assert sum(launches.values()) == fwd, dict(launches)
    launches.clear()
    y.sum().backward()
    assert sum(launches.values()) == bwd and "_sum_slices_kernel" not in launches, dict(launches)
    assert ("_routing_kernel" in launches) == (pattern == "mixlora_sep"), dict(launches)


def test_split_partials_are_summed_by_their_consumers(splits, launches):
    """Split: the routing kernel sums H's and dH_g's partials, and one launch sums both dA's and dB's."""
    splits(2)
    case = make_case("smora_r64_k8", n=128, d_in=128, d_out=128, with_out=True)  # 2 tiles per reduction
    leaves = {n: case[n].clone().requires_grad_() for n in ("x", "A", "B", "gates")}
    y = rank_activation_triton(leaves["x"], leaves["A"], leaves["B"], case["idx_a"], case["idx_b"], leaves["gates"],
                               0.7, case["block"], out=case["out"])
    assert launches == {"_matmul_kernel": 2, "_routing_kernel": 1}, dict(launches)
    launches.clear()
    y.sum().backward()
    assert launches == {"_matmul_kernel": 4, "_routing_kernel": 1, "_sum_slices_kernel": 1}, dict(launches)


def test_plain_lora_runs_no_routing_kernel(splits, launches):
    splits(1)
    case = _lora_case(n=64)
    _run_lora(rank_activation_triton, case)
    assert launches == {"_matmul_kernel": 2 + 4}, dict(launches)  # shrink, expand | dH_g, dB, dX, dA


def test_launch_plans_are_cached_per_shape():
    plans._gemm_plan_cached.cache_clear()
    case = make_case("smora_r64_k8", n=40)
    for _ in range(2):
        run(rank_activation_triton, case)
    info = plans._gemm_plan_cached.cache_info()
    # shrink, expand | dH_g, dB, dX, dA: each planned once; dH_g's plan is also read to decide the epilogue
    assert info.misses == 6 and info.hits == 8, info


# ----------------------------------------------------------------------------------------------
# torch.library operator: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------

def _op_args(pattern, n=40, h_given=False, dtype=torch.float32):
    case = make_case(pattern, n=n, d_in=30, d_out=20, dtype=dtype, with_out=True)
    route = {"same": ra.SAME, "sep": ra.SEPARATE, "dense": ra.DENSE, "modality": ra.SAME}[PATTERNS[pattern][3]]
    x, A, B, gates = (case[k].clone().requires_grad_() for k in ("x", "A", "B", "gates"))
    h = (x @ A.t()).detach().requires_grad_() if h_given else None
    idx_b = case["idx_b"] if route == ra.SEPARATE else None
    return (x, A, B, gates, h, case["out"], case["idx_a"], idx_b, 0.7, case["block"], route)


@pytest.mark.parametrize("pattern, h_given", [("smora_r64_k8", False), ("mixlora_sep", False),
                                              ("experts_8x16_dense", False), ("smora_r64_k8", True)])
def test_opcheck_forward_operator(pattern, h_given):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, static and dynamic."""
    torch.library.opcheck(ra.rank_activation_fwd, _op_args(pattern, h_given=h_given))


def test_opcheck_backward_operator():
    x, A, B, gates, h, out, idx_a, idx_b, scaling, block, route = _op_args("mixlora_sep")
    y, saved_h = ra.rank_activation_fwd(x, A, B, gates, h, out, idx_a, idx_b, scaling, block, route)
    dy = torch.randn_like(y)
    args = (dy, x.detach(), A.detach(), B.detach(), gates.detach(), saved_h.detach(), idx_a, idx_b, scaling, block,
            route, False, True, True, True, True, False)  # the backward is not differentiated (no double backward)
    torch.library.opcheck(ra.rank_activation_bwd, args)


def _layer(x, A, B, W, idx_a, idx_b, gates, h_given):
    """An adapted layer as the methods write it: base linear, then the op adds the update to its output."""
    out = x @ W.t()
    h = x @ A.t() if h_given else None
    return ra.rank_activation_triton(x, A, B, idx_a, idx_b, gates, 0.7, 1, h=h, out=out)


@pytest.mark.parametrize("pattern, h_given", [("smora_r64_k8", True), ("mixlora_sep", False),
                                              ("ranks_dense", False)])
def test_compiled_forward_backward_has_no_graph_break_and_matches_eager(pattern, h_given):
    case = make_case(pattern, n=48, d_in=32, d_out=32, with_out=False)
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))

    def step(x, A, B, gates):
        return _layer(x, A, B, W, case["idx_a"], case["idx_b"], gates, h_given).square().sum()

    leaves = [case[k] for k in ("x", "A", "B", "gates")]
    explain = torch._dynamo.explain(step)(*leaves)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        t = [v.clone().requires_grad_() for v in leaves]
        loss = fn(*t)
        loss.backward()
        results.append({"loss": loss.detach(), **{f"d{i}": v.grad for i, v in enumerate(t)}})
    assert_match(results[1], results[0], (1e-6, 1e-6), f"{pattern} compiled vs eager")


def test_compiled_through_the_dispatcher_with_plain_lora(monkeypatch):
    """moelora.ops.rank_activation with MOELORA_BACKEND=triton, gates None (LoRA): one graph, eager-equal."""
    import moelora.ops as ops

    monkeypatch.setenv("MOELORA_BACKEND", "triton")
    case = _lora_case(n=40)

    def step(x, A, B):
        return ops.rank_activation(x, A, B, None, None, None, 0.7, 1, out=case["out"]).sum()

    leaves = [case[k] for k in ("x", "A", "B")]
    explain = torch._dynamo.explain(step)(*leaves)
    assert explain.graph_break_count == 0, explain.break_reasons
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        t = [v.clone().requires_grad_() for v in leaves]
        fn(*t).backward()
        results.append({f"d{i}": v.grad for i, v in enumerate(t)})
    assert_match(results[1], results[0], (1e-6, 1e-6), "dispatcher compiled")
    # The compiled graph calls our operator (not a trace of its internals).
    gm = torch._dynamo.explain(step)(*leaves).graphs[0]
    assert "rank_activation_fwd" in gm.code


def test_half_precision_through_the_operator_under_compile():
    case = make_case("experts_8x16_top2", n=40, d_in=30, d_out=20, dtype=torch.float16, with_out=True)
    args = [case[k].clone().requires_grad_() for k in ("x", "A", "B", "gates")]

    def f(x, A, B, gates):
        return ra.rank_activation_triton(x, A, B, case["idx_a"], case["idx_b"], gates, 0.7, case["block"],
                                         out=case["out"]).float().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(*args).backward()
    ref = [v.detach().clone().requires_grad_() for v in args]
    f(*ref).backward()
    for got, want in zip(args, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=TOL[torch.float16][0], atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "smora", "r": 16, "k": 4}])
def test_a_whole_model_on_the_triton_path_compiles_to_one_graph(method, monkeypatch):
    """A tiny Llama with a method, MOELORA_BACKEND=triton: the training forward is one graph, and the compiled
    forward+backward (aot_eager) gives eager's loss and gradients."""
    import moelora
    from moelora.base_models import resolve_base_model
    from tests.conftest import randomize_adapters

    monkeypatch.setenv("MOELORA_BACKEND", "triton")
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, dict(method))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss(ids):
        return model(input_ids=ids, labels=ids).loss

    explain = torch._dynamo.explain(loss)(ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        value = fn(ids)
        value.backward()
        results.append({"loss": value.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}})
    assert len(results[0]) > 1
    assert_match(results[1], results[0], (1e-5, 1e-6), f"{method['name']} compiled model")
