"""The torch path of rank_activation against the token-by-token loop reference, values and gradients."""

import pytest
import torch

from moelora.ops import rank_activation, rank_activation_loop, rank_activation_torch


def _case(n=9, d_in=7, d_out=5, e=4, block=3, k=2, seed=0, separate=False, empty=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(e * block, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, e * block, generator=g, dtype=torch.float64)
    ia = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    ib = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if separate else ia
    if empty:
        ia = ia.clone(); ib = ib.clone()
        ia[0, :] = -1; ib[0, :] = -1       # a "no adapter" token
        ia[3, -1] = -1; ib[3, -1] = -1     # one empty slot
    gates = torch.rand(n, k, generator=g, dtype=torch.float64)
    return x, a, b, ia, ib, gates, block


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("block,k", [(1, 1), (1, 3), (3, 2), (3, 4)])
def test_matches_loop_reference(separate, empty, block, k):
    x, a, b, ia, ib, gates, block = _case(block=block, k=k, separate=separate, empty=empty)
    want = rank_activation_loop(x, a, b, ia, ib, gates, 0.7, block)
    got = rank_activation(x, a, b, ia, ib, gates, 0.7, block)
    torch.testing.assert_close(got, want)
    if empty:
        assert torch.all(got[0] == 0)


def test_dense_routing_and_out_and_h():
    x, a, b, _, _, _, block = _case()
    dense = torch.rand(x.shape[0], a.shape[0] // block, dtype=torch.float64)
    out = torch.randn(x.shape[0], b.shape[0], dtype=torch.float64)
    want = out + rank_activation_loop(x, a, b, None, None, dense, 0.5, block)
    torch.testing.assert_close(rank_activation(x, a, b, None, None, dense, 0.5, block, out=out), want)
    # a precomputed shrink gives the same result
    torch.testing.assert_close(rank_activation(x, a, b, None, None, dense, 0.5, block, h=x @ a.t(), out=out), want)
    # gates=None is plain LoRA: s * B A x
    torch.testing.assert_close(rank_activation(x, a, b, None, None, None, 0.5, block), 0.5 * x @ a.t() @ b.t())


@pytest.mark.parametrize("separate", [False, True])
def test_gradients_match_loop_reference(separate):
    tensors = _case(separate=separate, empty=True)
    x, a, b, ia, ib, gates, block = tensors
    grads = []
    for fn in (rank_activation_torch, rank_activation_loop):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gates)]
        out = fn(leaves[0], leaves[1], leaves[2], ia, ib, leaves[3], 0.3, block)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_gradcheck_dense():
    x, a, b, ia, _, gates, block = _case(n=4, d_in=3, d_out=2, e=3, block=2, k=2)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gates)]
    assert torch.autograd.gradcheck(lambda x_, a_, b_, g_: rank_activation_torch(x_, a_, b_, ia, ia, g_, 0.9, block), leaves)


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("MOELORA_BACKEND", "cuda-please")
    x, a, b, ia, ib, gates, block = _case()
    with pytest.raises(ValueError, match="MOELORA_BACKEND"):
        rank_activation(x, a, b, ia, ib, gates, 1.0, block)


def test_auto_backend_is_the_torch_path_even_for_gpu_tensors(monkeypatch):
    """auto takes the path measured faster end to end: torch, on GPUs too (benchmarks/RESULTS.md §5); the
    Triton kernel only when asked for. A stand-in for a CUDA tensor, with a Triton op available."""
    import types

    import moelora.ops as ops

    monkeypatch.setattr(ops, "_triton_op", lambda: (lambda *args, **kw: None))
    gpu_tensor = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    assert ops.backend_for(gpu_tensor) == "torch"
    monkeypatch.setenv("MOELORA_BACKEND", "triton")
    assert ops.backend_for(gpu_tensor) == "triton"
