"""X-LoRA against PEFT's XLoraModel (forward, checkpoints, generate) and its two-cache decoding (DESIGN §4.4)."""

import shutil

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from moelora.methods.xlora import XLoRAModel
from tests.methods.peft_experts import peft_classifier_state, peft_lora_logits, peft_xlora, save_peft_lora

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three PEFT experts of different ranks and alphas on q/v (PEFT's default LoRA targets)."""
    root = tmp_path_factory.mktemp("xlora_experts")
    return [save_peft_lora(root / f"e{i}", r=r, alpha=a, targets=QV, seed=10 + i)
            for i, (r, a) in enumerate([(4, 8), (2, 6), (3, 3)])]


@pytest.fixture
def padded():
    """Two prompts, the first left-padded by two (as evaluation batches generation)."""
    ids = torch.tensor([[256, 256, 7, 8, 9, 3], [10, 11, 12, 13, 14, 15]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ours(folders, classifier_state=None, **options):
    base, _ = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    cfg = moelora.XLoRAConfig(experts={str(i): f for i, f in enumerate(folders)}, target_modules=QV, **options)
    model = moelora.get_moelora_model(base, cfg)
    if classifier_state is not None:
        model.xlora_classifier.load_state_dict(classifier_state)
    return model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- PEFT parity -------------------------------------------------------------------------------------------
def test_single_peft_expert_gives_peft_lora_logits(experts, batch):
    torch.testing.assert_close(_logits(_ours(experts[:1]), batch), peft_lora_logits(experts[0], batch),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [
    {},
    {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16},
    {"top_k_lora": 2, "enable_softmax": False, "enable_softmax_topk": True, "xlora_depth": 3, "xlora_size": 8,
     "global_scaling_weight": 0.7},
    {"scaling_pass_value": 0.3, "softmax_temperature": 0.5, "layerwise_scalings": True, "top_k_lora": 1},
], ids=["defaults", "layerwise-depth2", "topk-softmax_topk-depth3", "pass_value-temperature"])
def test_forward_matches_peft_xlora(experts, padded, options):
    peft = peft_xlora(experts, **options)
    ours = _ours(experts, peft_classifier_state(peft), **options)
    want = _logits(peft, padded)
    torch.testing.assert_close(_logits(ours, padded), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, _logits(resolve_base_model("tiny-random-llama")[0], padded), atol=1e-3)


def test_scaling_pass_value_none_is_one_over_experts(experts, batch):
    peft = peft_xlora(experts)
    peft.set_scaling_pass_value(None)
    ours = _ours(experts, peft_classifier_state(peft), scaling_pass_value=None)
    torch.testing.assert_close(_logits(ours, batch), _logits(peft, batch), atol=1e-5, rtol=1e-5)


def test_loads_peft_xlora_checkpoint(experts, padded, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    peft = peft_xlora(experts, xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    peft.save_pretrained(str(tmp_path / "ckpt"))
    # PEFT 0.21.2 drops the classifier's first layer on save (its adapter-name filter matches ".0."): refused.
    with pytest.raises(moelora.CheckpointError, match=r"lacks classifier tensors \['layers.0.bias', 'layers.0.weight'\]"):
        moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "ckpt")
    full = {f"base_model.internal_xlora_classifier.{k}": v.contiguous() for k, v in peft_classifier_state(peft).items()}
    save_file(full, str(tmp_path / "ckpt" / "adapter_model.safetensors"), metadata={"format": "pt"})
    ours = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "ckpt")
    assert isinstance(ours, XLoRAModel) and not ours.trainable_parameters()
    base = resolve_base_model("tiny-random-llama")[0]
    base.config.use_cache = False
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "ckpt")).eval()
    torch.testing.assert_close(_logits(ours, padded), _logits(reloaded, padded), atol=1e-5, rtol=1e-5)


# --- generation: two KV caches ------------------------------------------------------------------------------
def test_cached_greedy_equals_uncached_and_peft_generate(experts, padded):
    peft = peft_xlora(experts, layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    ours = _ours(experts, peft_classifier_state(peft), layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    kw = dict(eos_token_id=None)  # no EOS: every step is compared
    cached = ours.generate(**padded, max_new_tokens=16, **kw)
    uncached = ours.generate(**padded, max_new_tokens=16, use_cache=False, **kw)
    with torch.no_grad():  # PEFT re-runs both passes over the prefix per token (slow): fewer tokens
        want = peft.generate(**padded, max_new_tokens=6, do_sample=False, **kw)
    assert cached.shape == (2, 6 + 16)
    assert torch.equal(cached, uncached) and torch.equal(cached[:, :6 + 6], want)


def test_eos_stops_a_sequence_and_pads_like_transformers(experts, padded):
    peft = peft_xlora(experts)
    ours = _ours(experts, peft_classifier_state(peft))
    free = ours.generate(**padded, max_new_tokens=6, eos_token_id=None)
    eos = int(free[1, 6 + 2])  # a token the second prompt produces at step 3: it must stop there
    got = ours.generate(**padded, max_new_tokens=6, eos_token_id=eos, pad_token_id=256)
    with torch.no_grad():
        want = peft.generate(**padded, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=256)
    assert torch.equal(got, want)
    stop = 6 + int((got[1, 6:] == eos).nonzero()[0])  # where the second sequence emitted EOS
    assert torch.equal(got[1, :stop + 1], free[1, :stop + 1]) and (got[1, stop + 1:] == 256).all()


def test_sampling_cached_equals_uncached(experts, padded):
    ours = _ours(experts)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, eos_token_id=None)
    torch.manual_seed(3)
    cached = ours.generate(**padded, **kw)
    torch.manual_seed(3)
    uncached = ours.generate(**padded, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_unsupported_generation_options_are_refused(experts, padded):
    with pytest.raises(moelora.ConfigError, match="generate.num_beams"):
        _ours(experts).generate(**padded, max_new_tokens=2, num_beams=2)


# --- training, saving, scalings ----------------------------------------------------------------------------
def _train_step(model, batch):
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.eval()


def test_frozen_experts_by_default_only_classifier_trains(experts, batch):
    model = _ours(experts, xlora_depth=2, xlora_size=8)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"xlora_classifier"}
    bank = {k: v.clone() for k, v in model.adapter_state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    head = {k: v.clone() for k, v in model.adapter_state_dict().items() if "classifier" in k}
    _train_step(model, batch)
    assert all(torch.equal(model.adapter_state_dict()[k], v) for k, v in bank.items())
    assert all(not torch.equal(model.adapter_state_dict()[k], v) for k, v in head.items())


def test_trainable_experts_survive_save_load(experts, batch, tmp_path):
    folders = [shutil.copytree(f, tmp_path / f"copy{i}") for i, f in enumerate(experts)]
    model = _ours([str(f) for f in folders], use_trainable_adapters=True)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    _train_step(model, batch)
    trained = model.adapter_state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in before.items() if k.endswith("lora_B"))
    model.save_pretrained(tmp_path / "adapter")
    for f in folders:  # the checkpoint holds the trained experts: the folders are not needed any more
        shutil.rmtree(f)
    again = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter",
                                                 is_trainable=True)
    assert all(torch.equal(again.adapter_state_dict()[k], v) for k, v in trained.items())
    assert any("lora_A" in n for n, p in again.named_parameters() if p.requires_grad)  # still trainable
    torch.testing.assert_close(_logits(again.eval(), batch), _logits(model, batch))


def test_gradient_checkpointing_gives_the_same_gradients(experts, batch):
    grads = []
    for checkpointing in (False, True):
        model = _ours(experts, use_trainable_adapters=True, layerwise_scalings=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_scalings_shapes_log_and_summary(experts, batch):
    model = _ours(experts)
    model.enable_scalings_logging()
    _logits(model, batch)
    scalings = model.get_latest_scalings()
    assert scalings.shape == (2, 12, 2 * len(QV), 3)  # [batch, seq, adapted modules, experts]
    torch.testing.assert_close(scalings.sum(-1), torch.ones(2, 12, 4))
    assert torch.equal(scalings[:, :, 0], scalings[:, :, 3])  # not layerwise: one set for every module
    model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=3, eos_token_id=None)
    assert [s.shape[1] for s in model.get_scalings_log()] == [12, 12, 1, 1]  # forward, prompt, 2 cached steps
    summary = model.scalings_summary()
    assert len(summary) == 4 and all(len(v) == 3 and abs(sum(v) - 1) < 1e-5 for v in summary.values())
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_topk_keeps_k_experts_and_softmax_topk_normalises(experts):
    model = _ours(experts, top_k_lora=2, enable_softmax_topk=True)
    layer = next(iter(model.adapter_layers().values()))
    idx, vals = layer._select(torch.randn(7, 3))
    assert idx.shape == vals.shape == (7, 2) and all(len(set(r.tolist())) == 2 for r in idx)
    torch.testing.assert_close(vals.sum(-1), torch.ones(7))


def test_base_model_called_directly_fails_clearly(experts, batch):
    model = _ours(experts)
    with pytest.raises(moelora.MoeloraError, match="call the XLoRAModel"):
        model.base_model(**batch)


@pytest.mark.parametrize("fields, key", [
    ({"experts": 2, "top_k_lora": 3}, "top_k_lora"),
    ({"xlora_depth": 0}, "xlora_depth"),
    ({"softmax_temperature": 0.0}, "softmax_temperature"),
    ({"xlora_dropout_p": 1.0}, "xlora_dropout_p"),
])
def test_config_validation_names_the_key(fields, key):
    with pytest.raises(moelora.ConfigError, match=f"method.{key}"):
        moelora.config_from_dict({"name": "xlora", **fields})


def test_hidden_size_must_match_the_base():
    with pytest.raises(moelora.ConfigError, match="method.hidden_size"):
        moelora.get_moelora_model(resolve_base_model("tiny-random-llama")[0], {"name": "xlora", "hidden_size": 32})


def test_cached_generation_on_gpt2(batch):
    from tests.conftest import randomize_adapters

    base, _ = resolve_base_model("tiny-random-gpt2")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, moelora.XLoRAConfig(experts=3, r=2, use_trainable_adapters=True,
                                                                 target_modules=["c_attn", "c_proj"]))
    randomize_adapters(model, seed=1, scale=0.2)
    model.eval()
    kw = dict(input_ids=batch["input_ids"][:, :6], max_new_tokens=8, eos_token_id=None)
    assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


# --- per-expert dropout (PEFT: each expert LoRA keeps its own lora_dropout) ---------------------------------
def test_each_expert_drops_out_its_input_with_its_own_folders_rate(batch, tmp_path):
    folders = [save_peft_lora(tmp_path / "noisy", r=2, alpha=4, targets=QV, seed=1, lora_dropout=0.5),
               save_peft_lora(tmp_path / "clean", r=2, alpha=4, targets=QV, seed=2, lora_dropout=0.0)]
    model = _ours(folders)
    assert model.method_config.expert_dropouts() == [0.5, 0.0]

    def train_vs_eval(silent):
        """(train-mode logits, eval-mode logits) with expert `silent`'s B zeroed (it adds nothing)."""
        for layer in model.adapter_layers().values():
            layer.lora_B.data[:, silent * layer.block:(silent + 1) * layer.block] = 0
        with torch.no_grad():
            return model.train()(**batch).logits, model.eval()(**batch).logits

    only_clean = train_vs_eval(0)
    torch.testing.assert_close(*only_clean)  # the clean expert drops nothing, even while training
    model = _ours(folders)
    only_noisy = train_vs_eval(1)
    assert not torch.allclose(*only_noisy, atol=1e-5)  # the noisy one drops half its input while training
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(folders[0])  # the checkpoint keeps the rates, not the folders
    reloaded = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    assert reloaded.method_config.expert_dropouts() == [0.5, 0.0]
    with pytest.raises(moelora.ConfigError, match="method.expert_dropout.nope"):
        moelora.XLoRAConfig(experts=2, expert_dropout={"nope": 0.1})
