"""MixLoRA (conditional factor selection, Shen et al. 2024) against a loop reference, and its routing rules:
per-sequence masked mean, rank-order pairing, routers that learn, and routing fixed during generation."""

import pytest
import torch
from torch import nn

import moelora
from moelora.base_models import resolve_base_model
from moelora.layer import RoutingContext
from moelora.methods import mixlora as mixlora_module
from moelora.methods.mixlora import MixLoRALayer
from tests.conftest import randomize_adapters


def _layer(d_in=6, d_out=5, **fields):
    torch.manual_seed(0)
    cfg = moelora.MixLoRAConfig(**{"num_factors": 7, "r": 3, "alpha": 5.0, **fields})
    layer = MixLoRALayer(nn.Linear(d_in, d_out), cfg, RoutingContext())
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference(layer, x, mask):
    """Sequence by sequence, straight from the paper/code: pool, score, sort, pair m-th A with m-th B."""
    cfg = layer.config
    y = layer.base_layer(x).clone()
    for b in range(x.shape[0]):
        real = [t for t in range(x.shape[1]) if cfg.pool_padding or mask is None or mask[b, t]]
        pooled = sum(x[b, t] for t in real) / len(real)
        score_a = torch.softmax(layer.router_A @ pooled, 0)
        order_a = sorted(range(cfg.num_factors), key=lambda e: -float(score_a[e]))[:cfg.r]
        score_b = torch.softmax(layer.router_B @ pooled, 0)
        if cfg.cond == "cfs":
            q = sum(torch.softmax(layer.lora_A[order_a[m]] @ layer.router_AB[m], 0) for m in range(cfg.r))
            score_b = score_b + cfg.ifs_weight * (torch.softmax(q, 0) if cfg.cfs_fusion == "code" else q)
        order_b = sorted(range(cfg.num_factors), key=lambda e: -float(score_b[e]))[:cfg.r]
        for t in range(x.shape[1]):
            for ia, ib in zip(order_a, order_b):  # rank order: the m-th best A factor with the m-th best B factor
                y[b, t] += cfg.scaling * layer.lora_B[:, ib] * (layer.lora_A[ia] @ x[b, t])
    return y


def _mask():
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return mask


@pytest.mark.parametrize("fields", [
    {"cond": "ifs"}, {"cond": "cfs"}, {"cond": "cfs", "cfs_fusion": "paper", "ifs_weight": 0.5},
    {"cond": "ifs", "pool_padding": True}, {"cond": "cfs", "router_train": "none"},
])
def test_forward_matches_loop_reference(fields):
    layer = _layer(**fields)
    x, mask = torch.randn(3, 5, 6), _mask()
    layer.context.start_forward(mask)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x, mask), rtol=1e-5, atol=1e-5)


def test_goes_through_the_op_with_separate_a_and_b_indices(monkeypatch):
    layer = _layer(cond="cfs")
    seen = []

    def spy(x, A, B, idx_a, idx_b, gates, scaling, block=1, **kw):
        seen.append((idx_a.shape, idx_b.shape, block))
        return real_op(x, A, B, idx_a, idx_b, gates, scaling, block, **kw)

    real_op = mixlora_module.rank_activation
    monkeypatch.setattr(mixlora_module, "rank_activation", spy)
    layer(torch.randn(2, 4, 6))
    assert seen == [(torch.Size([8, 3]), torch.Size([8, 3]), 1)]  # [tokens, r] block ids, one rank per block


def test_default_scaling_is_two_e_over_r():
    cfg = moelora.MixLoRAConfig()
    assert (cfg.num_factors, cfg.r, cfg.alpha, cfg.cond) == (16, 4, None, "cfs")
    assert cfg.scaling == 2 * 16 / 4
    assert moelora.MixLoRAConfig(alpha=8.0).scaling == 2.0


@pytest.mark.parametrize("bad,match", [({"r": 9, "num_factors": 8}, "method.r"), ({"cond": "both"}, "method.cond"),
                                       ({"alpha": -1.0}, "method.alpha"), ({"num_factors": 0}, "method.num_factors")])
def test_bad_config_names_the_key(bad, match):
    with pytest.raises(moelora.ConfigError, match=match):
        moelora.config_from_dict({"name": "mixlora", **bad})


@pytest.mark.parametrize("cond", ["ifs", "cfs"])
def test_routers_learn_with_ste_and_forward_is_unchanged(cond):
    layer = _layer(cond=cond)
    frozen = _layer(cond=cond, router_train="none")
    x, mask = torch.randn(3, 5, 6), _mask()
    layer.context.start_forward(mask)
    frozen.context.start_forward(mask)
    y = layer(x)
    assert torch.equal(y, frozen(x))  # the straight-through gate is exactly 1 in the forward pass
    (y * torch.randn_like(y)).sum().backward()
    for p in layer.router_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in frozen.router_parameters())  # reference mode: routers frozen


def test_unselected_factors_get_exactly_zero_gradient():
    layer = _layer(cond="ifs", num_factors=12, r=2)
    x = torch.randn(1, 4, 6)  # one sequence selects 2 of 12 factors per pool
    layer(x).sum().backward()
    rows_a = set(torch.nonzero(layer.lora_A.grad.abs().sum(1)).flatten().tolist())
    cols_b = set(torch.nonzero(layer.lora_B.grad.abs().sum(0)).flatten().tolist())
    assert len(rows_a) == 2 and len(cols_b) == 2


def test_padding_does_not_change_routing():
    layer = _layer(cond="cfs")
    seq = torch.randn(1, 3, 6)
    alone = layer(seq)  # no mask: all three tokens are real
    padded = torch.cat([torch.cat([seq, torch.randn(1, 4, 6) * 5], 1), torch.randn(1, 7, 6)])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    layer.context.start_forward(mask)
    torch.testing.assert_close(layer(padded)[:1, :3], alone, rtol=1e-5, atol=1e-6)
    parity = _layer(cond="cfs", pool_padding=True)  # the reference's plain mean: padding leaks into routing
    parity.context.start_forward(mask)
    assert not torch.allclose(parity(padded)[:1, :3], parity(seq))


def _tiny_mixlora(seed=3):
    base, tok = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, moelora.MixLoRAConfig(num_factors=6, r=2, alpha=4.0))
    randomize_adapters(model, seed=seed, scale=0.3)
    return model.eval(), tok


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 258)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_generation_keeps_the_prompt_routing_cached_equals_uncached_and_batch_equals_alone():
    model, _ = _tiny_mixlora()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (9, 5, 7)]
    ids, mask = _left_padded(prompts)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=258, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        layer = next(iter(model.adapter_layers().values()))
        kept = layer._kept[1].clone()
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        model(input_ids=ids, attention_mask=mask)  # the prompt alone routes to the same factors
        want_a, _, _, _ = layer.route(layer.pooled_input(_last_input[layer], 3))
        alone = [model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                **kw)[0, len(p):] for p in prompts]
    assert torch.equal(cached, uncached)
    assert torch.equal(kept, want_a)
    for row, new in enumerate(alone):  # left padding is excluded from the prompt's mean
        assert torch.equal(cached[row, ids.shape[1]:], new)


_last_input = {}


@pytest.fixture(autouse=True)
def _record_inputs(monkeypatch):
    """Keep each layer's last flattened input so a test can re-run the router on it."""
    original = MixLoRALayer.update

    def update(self, x, out):
        _last_input[self] = x.detach()
        return original(self, x, out)

    monkeypatch.setattr(MixLoRALayer, "update", update)
    yield
    _last_input.clear()


def test_decode_steps_do_not_reroute():
    """During generate, a one-token step reuses the prompt's factors rather than routing on that token."""
    model, _ = _tiny_mixlora(seed=5)
    ids = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    layer = next(iter(model.adapter_layers().values()))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=258,
                       eos_token_id=None)
        kept = layer._kept[1].clone()
        last_step = _last_input[layer]  # the final decode step: 2 tokens (one per sequence)
        assert last_step.shape[0] == 2
        rerouted, _, _, _ = layer.route(layer.pooled_input(last_step, 2))
    assert layer._kept[1].equal(kept)
    assert not torch.equal(rerouted, kept)  # routing on the token alone would have chosen other factors


def test_gradient_checkpointing_routes_and_counts_as_without(batch):
    grads, stats = [], []
    for checkpointing in (False, True):
        model, _ = _tiny_mixlora(seed=7)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
        stats.append(model.router_stats())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stats[0] == stats[1]  # recomputation inside backward is not counted twice
    assert all(s["tokens"] == 2 for s in stats[0].values())  # one routing decision per sequence


def test_training_routes_from_the_prompt_as_generation_does():
    """The factors chosen for a training sequence (prompt + response, labels -100 on the prompt) are those
    chosen when generating from its prompt: both pool the prompt's tokens (causal attention: the prompt's
    hidden states do not depend on the response)."""
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, moelora.MixLoRAConfig(num_factors=8, r=2,
                                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, seed=3, scale=0.5)
    chosen = {}
    for name, layer in model.adapter_layers().items():
        def route(pooled, layer=layer, name=name, route=layer.route):
            out = route(pooled)
            chosen.setdefault(name, (out[0].tolist(), out[1].tolist()))  # the first call: the prompt's choice
            return out
        layer.route = route
    gen = torch.Generator().manual_seed(5)
    prompt, response = torch.randint(3, 300, (1, 6), generator=gen), torch.randint(3, 300, (1, 10), generator=gen)
    ids = torch.cat([prompt, response], 1)
    labels = torch.cat([torch.full_like(prompt, -100), response], 1)
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    trained, chosen = chosen, {}
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False)
    assert len(chosen) == 6 and chosen == trained


def test_routing_pools_the_input_before_dropout():
    """With dropout on, a training forward selects the factors an eval forward selects (the reference pools
    the layer input before dropout; pooling the dropped-out input would make training's routing random)."""
    layer = _layer(num_factors=12, r=3, dropout=0.9)
    x = torch.randn(4, 6, 6)
    picks = []
    for training in (False, True):
        layer.train(training)
        layer.context.start_forward(torch.ones(4, 6))
        seen = []
        real_route = MixLoRALayer.route.__get__(layer)
        layer.route = lambda pooled: seen.append(real_route(pooled)) or seen[-1]
        layer(x)
        picks.append((seen[0][0].tolist(), seen[0][1].tolist()))
    assert picks[0] == picks[1]
