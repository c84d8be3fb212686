"""CoMoL against a token loop that builds the merged core, LoRA at E=1 with C=I, and its parameter formula.

Save -> fresh-process load of CoMoL runs in the shared matrix (tests/test_method_matrix.py, row "comol").
"""

import pytest
import torch
from torch import nn

import moelora
from moelora.base_models import resolve_base_model
from moelora.layer import RoutingContext
from moelora.methods.comol import CoMoLLayer


def _layer(core_router=True, num_experts=3, r=4, **kw):
    torch.manual_seed(0)
    cfg = moelora.CoMoLConfig(r=r, num_experts=num_experts, alpha=6.0, core_router=core_router, dropout=0.0, **kw)
    layer = CoMoLLayer(nn.Linear(5, 7), cfg, RoutingContext())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.normal_()
    return layer


def _loop(layer, x):
    """y_n = W0 x_n + b + s B (h_n C(x_n)),  h_n = A x_n,  C(x_n) = sum_e softmax(W_R h_n (or x_n))_e C_e."""
    ys = []
    for t in range(x.shape[0]):
        h = layer.lora_A @ x[t]
        g = torch.softmax(layer.router @ (h if layer.config.core_router else x[t]), 0)
        core = sum(g[e] * layer.cores[e] for e in range(layer.cores.shape[0]))  # the per-token merged core
        u = h @ core
        ys.append(layer.base_layer(x[t]) + layer.scaling * (layer.lora_B @ u))
    return torch.stack(ys)


@pytest.mark.parametrize("core_router", [True, False])
def test_forward_and_gradients_match_the_loop(core_router):
    layer = _layer(core_router)
    params = (layer.lora_A, layer.lora_B, layer.cores, layer.router)
    x = torch.randn(6, 5, requires_grad=True)
    grad_out = torch.randn(6, 7)
    got = layer(x)
    (got * grad_out).sum().backward()
    got_grads = [t.grad.clone() for t in (x, *params)]
    for t in (x, *params):
        t.grad = None
    want = _loop(layer, x)
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, t in zip(got_grads, (x, *params)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_one_identity_core_is_plain_lora():
    layer = _layer(num_experts=1)
    with torch.no_grad():
        layer.cores.copy_(torch.eye(4)[None])
    x = torch.randn(6, 5)
    want = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_parameter_count_matches_the_formula():
    """r (d_in + d_out) + E r^2 + E r per module (core router), E d_in instead of E r without it (spec §4.2)."""
    for core_router in (True, False):
        model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.CoMoLConfig(
            r=4, num_experts=3, core_router=core_router, target_modules=["q_proj", "down_proj"]))
        want = 0
        for layer in model.adapter_layers().values():
            d_in, d_out = layer.in_features, layer.out_features
            want += 4 * (d_in + d_out) + 3 * 16 + 3 * (4 if core_router else d_in)
        assert sum(p.numel() for p in model.trainable_parameters()) == want


def test_reference_defaults_and_bad_values():
    cfg = moelora.CoMoLConfig()
    assert (cfg.r, cfg.num_experts, cfg.scaling, cfg.core_router, cfg.dropout) == (16, 8, 1.0, True, 0.1)
    for key, value in [("r", 0), ("num_experts", 0), ("alpha", -1.0)]:
        with pytest.raises(moelora.ConfigError, match=f"method.{key}"):
            moelora.config_from_dict({"name": "comol", key: value})


def test_router_statistics_count_real_tokens(batch):
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0],
                                      moelora.CoMoLConfig(r=4, num_experts=3, target_modules=["q_proj"])).eval()
    with torch.no_grad():
        model(**batch)
    stats = model.router_stats()
    assert stats and all(s["tokens"] == int(batch["attention_mask"].sum()) for s in stats.values())
