"""MeteoRA against a loop written from the equations, a hand computation of its gate loss, and PEFT experts."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import moelora
from moelora.base_models import resolve_base_model
from moelora.layer import RoutingContext
from moelora.methods.meteora import MeteoRALayer
from tests.methods.peft_experts import peft_lora_logits, save_peft_lora

SHAPES = {"a": {"r": 2, "alpha": 4}, "b": {"r": 3, "alpha": 3}, "c": {"r": 1, "alpha": 2}}  # padded bank


def _layer(top_k, temperature=1.0, **kw):
    torch.manual_seed(0)
    cfg = moelora.MeteoRAConfig(experts=SHAPES, top_k=top_k, temperature=temperature, **kw)
    layer = MeteoRALayer(nn.Linear(5, 4), cfg, RoutingContext())
    with torch.no_grad():
        for e, spec in enumerate(cfg.expert_specs()):
            A, B = torch.randn(spec.r, 5), torch.randn(4, spec.r)
            layer.set_expert(e, A, B)
        layer.gate.normal_()
    return layer


def _loop(layer, x):
    """y_n = W0 x_n + b + sum_{j in top-k(z_n)} softmax(z_S / tau)_j * (alpha_j / r_j) B_j A_j x_n, token by token."""
    cfg = layer.config
    ys = []
    for t in range(x.shape[0]):
        z = layer.gate @ x[t]
        top, idx = z.topk(cfg.top_k)
        w = torch.softmax(top / cfg.temperature, 0)
        y = layer.base_layer(x[t])
        for j, e in enumerate(idx.tolist()):
            spec = cfg.expert_specs()[e]
            A, B = layer.expert_factors(e)
            y = y + w[j] * spec.alpha / spec.r * (B[:, :spec.r] @ (A[:spec.r] @ x[t]))
        ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 1.0)])  # k = E, tau = 1: dense softmax mixture
def test_forward_and_gradients_match_the_loop(top_k, temperature):
    layer = _layer(top_k, temperature)
    x = torch.randn(7, 5, requires_grad=True)
    grad_out = torch.randn(7, 4)
    got = layer(x)
    (got * grad_out).sum().backward()
    got_grads = [t.grad.clone() for t in (x, layer.gate, layer.lora_A, layer.lora_B)]
    for t in (x, layer.gate, layer.lora_A, layer.lora_B):
        t.grad = None
    want = _loop(layer, x)
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, t in zip(got_grads, (x, layer.gate, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)
    if top_k > 1:  # k = 1: w = 1, so the gate learns from its loss only
        assert layer.gate.grad.abs().sum() > 0


def test_dense_mixture_at_k_equals_e():
    layer = _layer(3)
    x = torch.randn(4, 5)
    dense = layer.base_layer(x).clone()
    w = torch.softmax(x @ layer.gate.t(), -1)
    for e, spec in enumerate(layer.config.expert_specs()):
        A, B = layer.expert_factors(e)
        dense += w[:, e:e + 1] * spec.alpha / spec.r * (x @ A.t() @ B.t())
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


def test_gate_reads_the_input_before_dropout():
    layer = _layer(1, dropout=0.5)
    x = torch.randn(64, 5)
    layer.eval()
    layer(x)
    want = layer.stats()["load"]
    layer.reset_stats()
    layer.train()
    layer(x)
    assert layer.stats()["load"] == want  # the same experts chosen with and without the experts' dropout


def _model(**kw):
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    fields = dict(experts=["add", "sort", "copy"], r=2, alpha=4, top_k=2, target_modules=["q_proj", "down_proj"])
    return moelora.get_moelora_model(base, moelora.MeteoRAConfig(**{**fields, **kw}))


def test_gate_loss_is_lambda_times_the_mean_ce_over_every_gate(batch):
    model = _model(gate_loss_coef=50.0).train()
    inputs = {}
    layers = model.adapter_layers()
    for name, layer in layers.items():
        layer.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
    labels = torch.tensor([2, 0])
    out = model(**batch, sample_labels=labels)
    mask = batch["attention_mask"].bool()
    ces = []
    for name, layer in layers.items():
        z = inputs[name] @ layer.gate.detach().t()  # [B, T, E]
        nll = -torch.log_softmax(z, -1).gather(-1, labels.view(2, 1, 1).expand(2, z.shape[1], 1)).squeeze(-1)
        # the reference's shift: position t counts when token t+1 is real; a mean per sample, then over samples
        ces.append(torch.stack([nll[b, :-1][mask[b, 1:]].mean() for b in range(2)]).mean())
    want = 50.0 * torch.stack(ces).mean()  # one mean over the gates = mean of the per-gate means
    torch.testing.assert_close(out.aux_loss, want, atol=1e-4, rtol=1e-5)
    assert model.method_config.task_labels(["sort", "other", "add"]) == [1, -100, 0]
    with pytest.raises(moelora.MoeloraError, match="sample_labels must be expert indices"):
        model(**batch, sample_labels=torch.tensor([3, 0]))


def test_gate_loss_is_the_same_however_the_step_is_split(batch):
    """The gate loss of a batch equals the mean of its samples' losses computed one by one: 2 processes x batch 1
    (or 2 accumulation steps, whose losses the trainers average) train as 1 x batch 2. The samples have different
    lengths (12 and 8 real tokens), so a mean over the batch's tokens would weight the longer one more."""
    model = _model(gate_loss_coef=50.0, dropout=0.0).train()
    labels = torch.tensor([2, 0])
    together = model(**batch, sample_labels=labels).aux_loss
    alone = [model(**{k: v[b:b + 1] for k, v in batch.items()}, sample_labels=labels[b:b + 1]).aux_loss for b in range(2)]
    torch.testing.assert_close(together, torch.stack(alone).mean(), atol=1e-5, rtol=1e-5)
    grads = {}
    for name, loss in (("together", lambda: model(**batch, sample_labels=labels).aux_loss),
                       ("split", lambda: sum(model(**{k: v[b:b + 1] for k, v in batch.items()},
                                                   sample_labels=labels[b:b + 1]).aux_loss / 2 for b in range(2)))):
        model.zero_grad()
        loss().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])
    torch.testing.assert_close(grads["split"], grads["together"], atol=1e-5, rtol=1e-4)


def test_gate_loss_trains_the_gates_towards_the_task(batch):
    model = _model(top_k=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=5e-2)
    labels = torch.tensor([1, 1])
    model.train()
    for _ in range(20):
        opt.zero_grad()
        loss = model(**batch, labels=batch["input_ids"], sample_labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()
    model.reset_router_stats()
    with torch.no_grad():
        model(**batch)
    loads = [s["load"][1] for s in model.router_stats().values()]
    assert min(loads) > 0.8  # every gate routes the tokens to the labelled expert (the last has no label: shift)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("meteora_experts")
    targets = ["q_proj", "v_proj"]
    return {"add": save_peft_lora(root / "add", r=4, alpha=8, targets=targets, seed=1),
            "sort": save_peft_lora(root / "sort", r=2, alpha=3, targets=targets, seed=2)}


def test_peft_folders_as_experts(experts, batch):
    base = resolve_base_model("tiny-random-llama")[0]
    one = moelora.get_moelora_model(base, moelora.MeteoRAConfig(experts={"add": experts["add"]}, top_k=1,
                                                                target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(**batch).logits, peft_lora_logits(experts["add"], batch), atol=1e-5, rtol=1e-5)
    # The same adapter twice: whatever the gate says, the mixture is that adapter.
    twice = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.MeteoRAConfig(
        experts={"x": experts["sort"], "y": experts["sort"]}, top_k=2, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        torch.testing.assert_close(twice(**batch).logits, peft_lora_logits(experts["sort"], batch), atol=1e-5, rtol=1e-5)
    # Loaded experts are frozen (gates only, the paper's setting); gate column e is expert e (config order).
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.MeteoRAConfig(
        experts={"sort": experts["sort"], "add": experts["add"]}, target_modules=["q_proj", "v_proj"]))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"gate"}
    from safetensors.torch import load_file

    peft = load_file(f"{experts['add']}/adapter_model.safetensors")
    layer = model.adapter_layers()["model.layers.0.self_attn.q_proj"]
    A, _ = layer.expert_factors(1)
    torch.testing.assert_close(A[:4], peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_save_and_load_in_a_fresh_process_with_peft_experts(experts, batch, tmp_path):
    model = moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], moelora.MeteoRAConfig(
        experts=experts, top_k=1, target_modules=["q_proj", "v_proj"]), base_model_id="tiny-random-llama")
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.gate.normal_()
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(batch, tmp_path / "batch.pt")  # test-only input exchange; checkpoints never use pickle
    script = textwrap.dedent(f"""
        import torch, moelora
        from moelora.base_models import resolve_base_model
        from safetensors.torch import save_file
        batch = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)
        model = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0],
                                                     {str(tmp_path / 'adapter')!r}, is_trainable=True)
        assert not model.adapter_layers()["model.layers.0.self_attn.q_proj"].lora_A.requires_grad  # still gates only
        with torch.no_grad():
            save_file({{"logits": model.eval()(**batch).logits}}, {str(tmp_path / 'out.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], want)


@pytest.mark.parametrize("key,value", [("top_k", 4), ("top_k", 0), ("temperature", 0.0), ("gate_loss_coef", -1.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(moelora.ConfigError, match=f"method.{key}"):
        moelora.config_from_dict({"name": "meteora", "experts": 3, key: value})


def test_reference_defaults():
    cfg = moelora.MeteoRAConfig()
    assert (cfg.top_k, cfg.temperature, cfg.gate_loss_coef, cfg.r, cfg.alpha) == (2, 1.0, 50.0, 8, 16.0)
    assert len(cfg.target_modules) == 7 and math.isclose(cfg.expert_specs()[0].scaling, 2.0)
