"""LoRA-Mixer against PEFT, against hand computations of its router loss, and through its stages (DESIGN §4.2)."""

import math

import pytest
import torch
from torch import nn

import moelora
from moelora.base_models import resolve_base_model
from moelora.layer import RoutingContext
from moelora.methods.lora_mixer import LoRAMixerLayer
from tests.conftest import randomize_adapters
from tests.methods.peft_experts import QKVO, peft_lora_logits, save_peft_lora


def _mixer(**kw):
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    return moelora.get_moelora_model(base, moelora.LoRAMixerConfig(**kw))


def _layer(n_experts=4, top_k=2, **kw):
    torch.manual_seed(0)
    cfg = moelora.LoRAMixerConfig(experts=n_experts, r=3, alpha=6.0, top_k=top_k, **kw)
    layer = LoRAMixerLayer(nn.Linear(5, 4), cfg, RoutingContext())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.normal_()
    return layer


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two PEFT experts of different rank and alpha (the padded bank must keep each exact)."""
    root = tmp_path_factory.mktemp("experts")
    return {"add": save_peft_lora(root / "add", r=4, alpha=8, seed=1),
            "sort": save_peft_lora(root / "sort", r=2, alpha=3, seed=2, use_rslora=True)}


# --- PEFT parity and routing by label ----------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_single_peft_expert_gives_peft_logits(experts, batch, training):
    model = _mixer(experts={"add": experts["add"]}, stage="plug_and_play")
    model.train(training)  # soft mixture (training) and top-K (inference) agree with one expert
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, peft_lora_logits(experts["add"], batch), atol=1e-5, rtol=1e-5)


def test_hard_routing_by_label_uses_exactly_the_labelled_expert(experts, batch):
    model = _mixer(experts=experts, stage="joint_stage1").eval()
    assert model.method_config.task_labels(["sort", "add", "sort"]) == [1, 0, 1]
    with torch.no_grad():
        got = model(**batch, sample_labels=torch.tensor([1, 0])).logits
    torch.testing.assert_close(got[0], peft_lora_logits(experts["sort"], batch)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], peft_lora_logits(experts["add"], batch)[1], atol=1e-5, rtol=1e-5)


def test_stage1_trains_only_the_labelled_expert(batch):
    model = _mixer(experts=["add", "sort", "count"], r=2, stage="joint_stage1").train()
    randomize_adapters(model, seed=3)
    assert all(not layer.router.requires_grad for layer in model.adapter_layers().values())  # router unused
    model(**batch, labels=batch["input_ids"], sample_labels=torch.tensor([2, 2])).loss.backward()
    for layer in model.adapter_layers().values():
        grads = [layer.lora_A.grad[e * 2:(e + 1) * 2] for e in range(3)]  # block = r = 2 rows per expert
        assert grads[0].abs().sum() == 0 and grads[1].abs().sum() == 0 and grads[2].abs().sum() > 0
    with pytest.raises(moelora.MoeloraError, match="sample_labels"):
        model(**batch, labels=batch["input_ids"])
    with pytest.raises(moelora.ConfigError, match="task 'reverse' has none"):
        model.method_config.task_labels(["add", "reverse"])


# --- the router loss (SBL / RSL) ---------------------------------------------------------------------------
def _hand_terms(layer, x, mask):
    logits = (x[mask] @ layer.router.t()).detach()
    p = torch.softmax(logits, -1)
    e = p.shape[1]
    frac_top1 = torch.tensor([(p.argmax(-1) == i).float().mean() for i in range(e)])
    balance = e * sum(p[:, i].mean() * frac_top1[i] for i in range(e))
    entropy = torch.stack([-(row * row.log()).sum() for row in p]).mean()
    return balance, entropy


@pytest.mark.parametrize("printed_sign", [False, True])
def test_sbl_terms_match_hand_computation(printed_sign):
    layer = _layer(balance_coef=0.3, entropy_coef=0.2, entropy_sign_as_printed=printed_sign).train()
    x = torch.randn(2, 6, 5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding is excluded from every statistic
    layer.context.start_forward(mask)
    layer(x)
    (loss,) = layer.context.aux_losses
    balance, entropy = _hand_terms(layer, x.reshape(-1, 5), mask.reshape(-1))
    sign = -1.0 if printed_sign else 1.0
    torch.testing.assert_close(loss, 0.3 * balance + sign * 0.2 * entropy)
    terms = layer.stats()["loss_terms"]
    assert math.isclose(terms["balance"], balance.item(), rel_tol=1e-5)
    assert math.isclose(terms["entropy"], entropy.item(), rel_tol=1e-5)


@pytest.mark.parametrize("printed_sign", [False, True])
def test_entropy_sign_sets_the_direction_and_router_gets_gradient(printed_sign):
    layer = _layer(balance_coef=0.0, entropy_coef=0.5, entropy_sign_as_printed=printed_sign).train()
    x = torch.randn(64, 5)
    layer.context.start_forward(None)

    def mean_entropy():
        p = torch.softmax(x @ layer.router.detach().t(), -1)
        return float(-(p * p.log()).sum(-1).mean())

    before = mean_entropy()
    opt = torch.optim.SGD([layer.router], lr=0.5)
    for _ in range(5):
        layer.context.aux_losses = []
        layer(x)
        layer.context.aux_losses[0].backward()
        assert layer.router.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    # Default: entropy minimised (peaked routing, as the paper's text); printed sign: maximised.
    assert (mean_entropy() > before) if printed_sign else (mean_entropy() < before)


def test_router_gradient_through_the_model_and_loss_terms_logged(experts, batch):
    model = _mixer(experts=experts, stage="plug_and_play").train()
    out = model(**batch, labels=batch["input_ids"])
    assert "aux_loss" in out and out.loss > out["aux_loss"] > 0
    out.loss.backward()
    layers = model.adapter_layers().values()
    assert all(layer.router.grad.abs().sum() > 0 for layer in layers)
    assert all(not layer.lora_A.requires_grad for layer in layers)  # plug-and-play: router only
    from moelora.training.metrics import summarise_router_stats

    logged = summarise_router_stats(model.router_stats())
    assert logged["aux/balance"] > 0 and logged["aux/entropy"] > 0 and "aux/preserve" not in logged  # beta = 0


# --- inference: top-K of the soft router -----------------------------------------------------------------
def _reference(layer, x, k, renorm):
    """Token by token from the formula: top-k of softmax(W_r x), optionally renormalised, each with s_e."""
    out = []
    for xt in x:
        p = torch.softmax(layer.router @ xt, -1)
        keep = p.topk(k).indices.tolist()
        g = {e: p[e] for e in keep}
        total = sum(g.values()) if renorm else 1.0
        y = layer.base_layer(xt)
        for e, ge in g.items():
            A, B = layer.expert_factors(e)
            y = y + (ge / total) * layer.expert_scaling[e] * (B @ (A @ xt))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("renorm", [True, False])
def test_topk_inference_matches_reference(renorm):
    layer = _layer(top_k=2, renormalize_top_k=renorm).eval()
    x = torch.randn(9, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x, 2, renorm), rtol=1e-5, atol=1e-6)


def test_topk_inference_vs_dense_training_on_tiny_model(batch):
    dense = _mixer(experts=3, r=2, top_k=3, train_experts=True)
    randomize_adapters(dense, seed=5, scale=0.3)
    sparse = _mixer(experts=3, r=2, top_k=2, train_experts=True)
    sparse.load_adapter_state_dict(dense.adapter_state_dict())
    with torch.no_grad():
        train_logits = dense.train()(**batch).logits
        topk_all = dense.eval()(**batch).logits  # K = E renormalised is exactly the soft mixture
        top2 = sparse.eval()(**batch).logits
        sparse.method_config.top_k = 0  # the flag for a soft mixture at inference too
        soft = sparse(**batch).logits
    torch.testing.assert_close(topk_all, train_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft, train_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(top2, train_logits, atol=1e-4)  # dropping the third expert changes the output
    sparse.reset_router_stats()
    with torch.no_grad():
        sparse.method_config.top_k = 2
        sparse(**batch)
    for layer in sparse.adapter_layers().values():  # two experts counted per real (non-padding) token
        assert float(layer.stat_load.sum()) == 2 * float(layer.stat_tokens) == 2 * int(batch["attention_mask"].sum())


@pytest.mark.parametrize("top_k", [1, 2])
def test_train_top_k_routes_top_k_experts_in_training(batch, top_k):
    """MoE-LoRA's top-1/top-2 baselines: with train_top_k the training forward is the top-K forward, only the
    selected experts get gradients, and the router still learns (through the gates and the SBL terms)."""
    model = _mixer(experts=3, r=2, top_k=top_k, train_experts=True, train_top_k=True)
    randomize_adapters(model, seed=5, scale=0.3)
    with torch.no_grad():
        want = model.eval()(**batch).logits
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    assert out.aux_loss is not None
    out.loss.backward()
    layer = model.adapter_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.router.grad.abs().sum() > 0
    if top_k == 1:  # an expert no token picked gets no gradient at all
        used = set(layer.stat_load.nonzero().flatten().tolist())
        for e in set(range(3)) - used:
            assert layer.lora_B.grad[:, e * layer.block:(e + 1) * layer.block].abs().sum() == 0
    soft = _mixer(experts=3, r=2, top_k=top_k, train_experts=True)
    soft.load_adapter_state_dict(model.adapter_state_dict())
    with torch.no_grad():
        assert not torch.allclose(soft.train()(**batch).logits, want, atol=1e-4)  # default: soft in training


# --- shared q/k/v router, preservation, stage 2 from stage 1 ------------------------------------------------
def test_shared_router_is_one_parameter_per_block(batch, tmp_path):
    model = _mixer(experts=3, r=2, shared_router=True, train_experts=True).train()
    keys = [k for k in model.adapter_state_dict() if k.endswith(".router")]
    assert sorted(k.split(".")[-2] for k in keys) == ["o_proj", "o_proj", "q_proj", "q_proj"]  # 2 blocks x (qkv, o)
    randomize_adapters(model, seed=7)
    out = model(**batch, labels=batch["input_ids"])
    assert len(model.context.aux_losses) == 4  # one loss per router, not per module
    out.loss.backward()
    q = model.base_model.model.layers[0].self_attn.q_proj
    k = model.base_model.model.layers[0].self_attn.k_proj
    assert k.router_weight() is q.router and q.router.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "a")
    again = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model.eval()(**batch).logits)


def test_preservation_term_anchors_to_loaded_experts(experts, batch, tmp_path):
    model = _mixer(experts=experts, train_experts=True, preserve_coef=0.5, balance_coef=0.0, entropy_coef=0.0).train()
    model(**batch)
    assert torch.stack(model.context.aux_losses).sum().item() == 0.0  # theta == theta0 at the start
    layer = model.adapter_layers()["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        layer.lora_B[0, 0] += 2.0
    model(**batch)
    torch.testing.assert_close(torch.stack(model.context.aux_losses).sum(), torch.tensor(0.5 * 4.0))
    model.save_pretrained(tmp_path / "a")  # anchors travel with the adapter (exact resume)
    again = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "a",
                                                 is_trainable=True)
    again(**batch)
    torch.testing.assert_close(torch.stack(again.context.aux_losses).sum(), torch.tensor(0.5 * 4.0))


def test_stage2_starts_from_stage1_with_frozen_experts(batch, tmp_path):
    stage1 = _mixer(experts=["add", "sort"], r=2, stage="joint_stage1")
    randomize_adapters(stage1, seed=8, scale=0.2)
    stage1.save_pretrained(tmp_path / "s1")
    stage2 = _mixer(experts=["add", "sort"], r=2, stage="joint_stage2", init_from=str(tmp_path / "s1"))
    for name, layer in stage2.adapter_layers().items():
        assert torch.equal(layer.lora_B, stage1.adapter_layers()[name].lora_B)
        assert layer.router.requires_grad and not layer.lora_A.requires_grad
    stage2.save_pretrained(tmp_path / "s2")
    saved = moelora.checkpoint.read_json(tmp_path / "s2" / "moelora_config.json")["config"]
    assert saved["init_from"] is None and saved["train_experts"] is False
    with pytest.raises(moelora.CheckpointError, match="does not fit this config: its experts"):
        _mixer(experts=["add", "sort", "count"], r=2, init_from=str(tmp_path / "s1"))


def test_init_from_reads_the_folder_as_from_pretrained_does(tmp_path):
    """One moelora-folder reader: init_from validates the saved config and the base fingerprint as
    from_pretrained does (a malformed config is one clear CheckpointError, not an AttributeError)."""
    stage1 = _mixer(experts=["add", "sort"], r=2, stage="joint_stage1")
    stage1.save_pretrained(tmp_path / "s1")
    path = tmp_path / "s1" / "moelora_config.json"
    meta = moelora.checkpoint.read_json(path)
    moelora.checkpoint.write_json(path, {**meta, "config": "oops"})
    for load in (lambda: _mixer(experts=["add", "sort"], r=2, init_from=str(tmp_path / "s1")),
                 lambda: moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "s1")):
        with pytest.raises(moelora.CheckpointError, match="'config' must be a JSON object"):
            load()
    moelora.checkpoint.write_json(path, meta)
    other_base = resolve_base_model("tiny-random-llama")[0]
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.add_(1.0)  # other base weights: another fingerprint
    with pytest.raises(moelora.CheckpointError, match="base"):
        moelora.get_moelora_model(other_base, moelora.LoRAMixerConfig(experts=["add", "sort"], r=2,
                                                                      init_from=str(tmp_path / "s1")))


# --- experts from PEFT folders: validation and self-contained checkpoints ------------------------------------
def test_saved_checkpoint_does_not_need_the_expert_folders(experts, batch, tmp_path):
    import shutil

    folder = tmp_path / "moved"
    shutil.copytree(experts["add"], folder)
    model = _mixer(experts={"add": str(folder), "sort": experts["sort"]}, stage="plug_and_play")
    randomize_adapters(model, seed=9)  # the trained router
    model.save_pretrained(tmp_path / "a")
    shutil.rmtree(folder)
    saved = moelora.checkpoint.read_json(tmp_path / "a" / "moelora_config.json")["config"]["experts"]
    assert saved["add"] == {"r": 4, "alpha": 8.0, "use_rslora": False, "source": str(folder)}
    again = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model.eval()(**batch).logits)


def test_bad_expert_folders_fail_clearly(experts, tmp_path):
    qv = save_peft_lora(tmp_path / "qv", r=2, alpha=4, targets=["q_proj", "v_proj"])
    # target_modules given and wider than the expert's (left out, they would be the expert's own)
    with pytest.raises(moelora.CheckpointError, match=r"'qv'.*not in the expert: .*k_proj"):
        _mixer(experts={"qv": qv}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((tmp_path / "qv" / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(moelora.CheckpointError, match="refusing to load .*adapter_model.bin"):
        moelora.LoRAMixerConfig(experts={"p": str(pickle_only)})
    with pytest.raises(moelora.ConfigError, match="method.experts.x.*not found"):
        moelora.LoRAMixerConfig(experts={"x": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("fields, key", [
    ({"stage": "plug_and_play", "train_experts": True}, "train_experts"),
    ({"stage": "joint_stage1", "train_experts": False}, "train_experts"),
    ({"experts": 2, "train_experts": False, "preserve_coef": 0.1}, "preserve_coef"),
    ({"top_k": -1}, "top_k"),
    ({"experts": 0}, "experts"),
    ({"experts": ["a", "a"]}, "experts"),
    ({"experts": {"a": {"rank": 2}}}, "experts.a.rank"),
])
def test_config_validation_names_the_key(fields, key):
    with pytest.raises(moelora.ConfigError, match=f"method.{key}"):
        moelora.config_from_dict({"name": "lora_mixer", **fields})


def test_defaults_follow_design():
    cfg = moelora.LoRAMixerConfig()
    assert cfg.target_modules is None and cfg.top_k == 3 and cfg.renormalize_top_k  # None: the attention projections
    assert _mixer().method_config.target_modules == QKVO  # ...of this (Llama) base
    assert (cfg.balance_coef, cfg.entropy_coef, cfg.preserve_coef) == (0.01, 0.01, 0.0)
    assert cfg.experts_trainable()  # fresh experts train with the router...
    with pytest.raises(moelora.ConfigError, match=r"method.experts.*plug_and_play.*\['a'\] are fresh"):
        moelora.LoRAMixerConfig(experts={"a": None}, stage="plug_and_play")  # a router over zero experts: refused


def test_stage1_evaluation_routes_each_prompt_by_its_task():
    from moelora.data.tasks import build_task_suite
    from moelora.evaluation import evaluate_exact_match

    base, tokenizer = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, moelora.LoRAMixerConfig(experts=["add", "sort_asc"], r=2,
                                                                     stage="joint_stage1"))
    _, examples = build_task_suite(["add", "sort_asc"], 1, 3, seed=0)
    seen, generate = [], model.generate

    def spy(**kwargs):
        prompts = tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        seen.extend(zip(kwargs["sample_labels"].tolist(), prompts))
        return generate(**kwargs)

    model.generate = spy
    evaluate_exact_match(model, tokenizer, examples, batch_size=4, max_new_tokens=2, progress=False)
    assert len(seen) == 6  # every prompt routed to its task's expert: add prompts ask "What is a + b?"
    assert all((label == 0) == ("+" in prompt) for label, prompt in seen)


@pytest.mark.parametrize("stage", ["joint_stage1", "joint_stage2"])
def test_gradient_checkpointing_gives_the_same_gradients_and_loss(batch, stage):
    results = []
    for checkpointing in (False, True):
        model = _mixer(experts=["a", "b", "c"], r=2, stage=stage, train_experts=True, preserve_coef=0.1)
        randomize_adapters(model, seed=11, scale=0.2)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        out = model(**batch, labels=batch["input_ids"], sample_labels=torch.tensor([0, 2]))
        out.loss.backward()
        assert len(model.context.aux_losses) == 8  # one per layer, not again during recomputation
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5)
