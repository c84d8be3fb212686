"""SMoRA against a hand-written reference, and the loss-free bias's bookkeeping rules (DESIGN §4.1)."""

import pytest
import torch
from torch import nn

import moelora
from moelora.layer import LayerSite, RoutingContext
from moelora.methods.smora import SMoRALayer
from tests.conftest import randomize_adapters
from tests.processes import REPO


def _layer(gate_fn="sigmoid_norm", bias_in_gate=True, r=8, k=3, alpha=6.0):
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    cfg = moelora.SMoRAConfig(r=r, k=k, alpha=alpha, gate_fn=gate_fn, bias_in_gate=bias_in_gate)
    layer = SMoRALayer(base, cfg, RoutingContext(), LayerSite.alone())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_(std=0.3)
    return layer


def _reference(layer, x):
    """Token by token, straight from the paper/code: select, normalise, scale (alpha/k) * (k * g)."""
    cfg = layer.config
    out = []
    for xt in x:
        logits = layer.router @ xt
        if cfg.gate_fn == "sigmoid_norm":
            scores = torch.sigmoid(logits)
            biased = scores + layer.bias
            chosen = sorted(range(cfg.r), key=lambda j: -float(biased[j].detach()))[:cfg.k]
            vals = torch.stack([(biased if cfg.bias_in_gate else scores)[j] for j in chosen])
            g = vals / vals.sum()
        else:
            biased = logits + layer.bias
            chosen = sorted(range(cfg.r), key=lambda j: -float(biased[j].detach()))[:cfg.k]
            vals = torch.stack([(biased if cfg.bias_in_gate else logits)[j] for j in chosen])
            g = torch.softmax(vals, 0)
        y = layer.base_layer(xt)
        for gj, j in zip(g, chosen):
            y = y + (cfg.alpha / cfg.k) * (cfg.k * gj) * layer.lora_B[:, j] * (layer.lora_A[j] @ xt)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("gate_fn", ["sigmoid_norm", "softmax_topk"])
@pytest.mark.parametrize("bias_in_gate", [True, False])
def test_forward_matches_loop_reference(gate_fn, bias_in_gate):
    layer = _layer(gate_fn, bias_in_gate)
    x = torch.randn(11, 5)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_default_per_rank_weight_is_two():
    cfg = moelora.SMoRAConfig()
    assert (cfg.r, cfg.k, cfg.alpha) == (64, 8, 16.0)
    # scaling alpha/k times gate k*g with g summing to 1: uniform gates give alpha/k = 2 per rank
    assert cfg.alpha / cfg.k == 2.0


def test_gates_are_normalised_over_selected():
    layer = _layer()
    logits = torch.randn(6, 8)
    selected, gates = layer.route(logits)
    assert selected.shape == gates.shape == (6, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(6))
    assert all(len(set(row.tolist())) == 3 for row in selected)


def _smora_model(tiny_llama, **kw):
    base, _ = tiny_llama
    torch.manual_seed(0)
    return moelora.get_moelora_model(base, moelora.SMoRAConfig(r=8, k=2, bias_update_rate=0.5, **kw))


def test_router_gradient_is_zero_at_init_then_nonzero(tiny_llama, batch):
    model = _smora_model(tiny_llama)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    routers = [layer.router for layer in model.adapter_layers().values()]
    assert all(float(r.grad.abs().max()) == 0.0 for r in routers)  # B = 0: no signal through the gates
    model.zero_grad()
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(std=0.05)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(float(r.grad.abs().max()) > 0.0 for r in routers)


def test_bias_updates_once_per_optimizer_step_from_summed_counts(tiny_llama, batch):
    model = _smora_model(tiny_llama)
    layer = next(iter(model.adapter_layers().values()))
    inputs = []
    layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().reshape(-1, m.in_features)))
    for micro in range(4):  # gradient accumulation 4: four forwards, no bias change in between
        ids = batch["input_ids"].roll(micro, dims=1)
        model(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss.backward()
        assert torch.all(layer.bias == 0)
    real = batch["attention_mask"].reshape(-1).bool()
    expected = torch.zeros(8)
    with torch.no_grad():
        for x in inputs:
            sel, _ = layer.route(x @ layer.router.t())
            expected += torch.bincount(sel[real].flatten(), minlength=8).float()
    assert float(expected.sum()) == 4 * int(real.sum()) * 2
    torch.testing.assert_close(layer.pending_counts, expected)
    model.update_router_state()
    torch.testing.assert_close(layer.bias, 0.5 * torch.sign(expected.mean() - expected))
    assert torch.all(layer.pending_counts == 0)


def test_padding_is_not_counted(tiny_llama, batch):
    model = _smora_model(tiny_llama)
    model(**batch)
    real_tokens = int(batch["attention_mask"].sum())
    for layer in model.adapter_layers().values():
        assert float(layer.pending_counts.sum()) == real_tokens * 2  # k = 2 selections per real token
        assert layer.stats()["tokens"] == real_tokens


def test_recompute_is_not_counted_and_checkpointing_keeps_gradients(tiny_llama, batch):
    grads, counts = [], []
    for checkpointing in (False, True):
        base, _ = tiny_llama
        base = type(base)(base.config)  # same architecture, fresh copy
        base.load_state_dict(tiny_llama[0].state_dict())
        torch.manual_seed(0)
        model = moelora.get_moelora_model(base, moelora.SMoRAConfig(r=8, k=2))
        randomize_adapters(model, seed=1)
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert base.is_gradient_checkpointing
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
        counts.append([layer.pending_counts.clone() for layer in model.adapter_layers().values()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)
    for c0, c1 in zip(*counts):
        assert torch.equal(c0, c1)  # the recomputation inside backward added nothing


def test_smora_refuses_to_merge(tiny_llama):
    model = _smora_model(tiny_llama)
    with pytest.raises(moelora.MoeloraError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("bad,match", [
    (dict(r=4, k=8), "method.k"),
    (dict(k=0), "method.k"),
    (dict(gate_fn="softmax"), "method.gate_fn"),
    (dict(bias_update_rate=-1.0), "method.bias_update_rate"),
    (dict(r="64"), "method.r"),
])
def test_config_validation(bad, match):
    with pytest.raises(moelora.ConfigError, match=match):
        moelora.SMoRAConfig.from_dict(bad, prefix="method")


def test_recompute_guard_is_what_prevents_double_counting(tiny_llama, batch, monkeypatch):
    """Without the in_backward guard the checkpointed forward would be counted twice."""
    import moelora.methods.smora as smora

    model = _smora_model(tiny_llama)
    model.enable_gradient_checkpointing()
    model.train()
    monkeypatch.setattr(smora, "in_backward", lambda: False)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    real_tokens = int(batch["attention_mask"].sum())
    layer = next(iter(model.adapter_layers().values()))
    assert float(layer.pending_counts.sum()) == 2 * real_tokens * 2  # forward + recompute


# --- block_size: experts of several ranks (the paper's MoE-LoRA comparison) -------------------------------
def _block_reference(layer, x):
    """Token by token: score the R/b blocks, keep the top-k, y += (alpha / (k b)) * k g_j * B_j A_j x."""
    cfg = layer.config
    b, out = cfg.block_size, []
    for xt in x:
        scores = torch.sigmoid(layer.router @ xt) + layer.bias
        chosen = sorted(range(cfg.n_experts), key=lambda j: -float(scores[j].detach()))[:cfg.k]
        vals = torch.stack([scores[j] for j in chosen])
        y = layer.base_layer(xt)
        for gj, j in zip(vals / vals.sum(), chosen):
            A, B = layer.lora_A[j * b:(j + 1) * b], layer.lora_B[:, j * b:(j + 1) * b]
            y = y + cfg.alpha / (cfg.k * b) * (cfg.k * gj) * (B @ (A @ xt))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("r,block_size,k", [(8, 2, 2), (12, 4, 1), (12, 3, 4)])
def test_block_experts_match_the_loop_with_gradients(r, block_size, k):
    torch.manual_seed(0)
    cfg = moelora.SMoRAConfig(r=r, k=k, alpha=6.0, block_size=block_size)
    layer = SMoRALayer(nn.Linear(5, 4), cfg, RoutingContext())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bias.normal_(std=0.3)
    assert layer.router.shape == (r // block_size, 5) and layer.bias.shape == (r // block_size,)
    x = torch.randn(9, 5, requires_grad=True)
    got = layer(x)
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.router)]
    for t in (x, layer.lora_A, layer.lora_B, layer.router):
        t.grad = None
    want = _block_reference(layer, x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, t in zip(grads, (x, layer.lora_A, layer.lora_B, layer.router)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_one_block_of_all_ranks_is_lora():
    """block_size = r, k = 1: one expert always chosen with gate 1, i.e. LoRA-r with scale alpha/r."""
    torch.manual_seed(0)
    layer = SMoRALayer(nn.Linear(5, 4), moelora.SMoRAConfig(r=6, k=1, alpha=12.0, block_size=6), RoutingContext())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 5)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t())


def test_block_size_must_divide_r_and_k_counts_experts():
    with pytest.raises(moelora.ConfigError, match="method.block_size"):
        moelora.config_from_dict({"name": "smora", "r": 64, "k": 1, "block_size": 7})
    with pytest.raises(moelora.ConfigError, match=r"method.k.*r/block_size=8"):
        moelora.config_from_dict({"name": "smora", "r": 64, "k": 9, "block_size": 8})


def test_the_papers_table_runs_from_configs():
    """configs/ablation/: LoRA-8, LoRA-64, MoE-LoRA 8 x r8 top-1/top-2 and SMoRA-64/8 build, with the total and
    activated ranks the comparison holds equal, and the same per-rank scale 2."""
    from moelora.base_models import resolve_base_model
    from moelora.training.run_config import load_run_config

    folder = REPO / "configs" / "ablation"
    want = {"lora8": (8, 8), "lora64": (64, 64), "moe_lora_8x8_top1": (64, 8), "moe_lora_8x8_top2": (64, 16),
            "smora64_8": (64, 8)}
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(want)
    for name, (total, active) in want.items():
        cfg = moelora.config_from_dict(load_run_config(str(folder / f"{name}.yaml"), []).method)
        model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], cfg)
        layer = next(iter(model.adapter_layers().values()))
        assert layer.lora_A.shape[0] == total, name
        if cfg.method_name == "smora":
            assert cfg.k * cfg.block_size == active and layer.scaling == cfg.alpha / active, name
            # SMoRA: uniform gates weigh each rank 2; MoE-LoRA: an expert chosen alone is a LoRA-8 of scale 2
            assert (cfg.alpha / cfg.k if cfg.block_size == 1 else cfg.alpha / cfg.block_size) == 2.0, name
        else:
            assert cfg.r == active and layer.scaling == 2.0, name
