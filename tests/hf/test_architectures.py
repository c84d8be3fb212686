"""Any architecture: PEFT's target matching, all-linear, per-architecture defaults, targets from PEFT experts."""

import pytest
import torch
import transformers

import moelora
from moelora.targets import ARCHITECTURE_TARGETS, find_targets

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, SMALL),
    "qwen2": (transformers.Qwen2Config, SMALL),
    "mistral": (transformers.MistralConfig, SMALL),
    "gemma": (transformers.GemmaConfig, {**SMALL, "head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, {**SMALL, "head_dim": 8}),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "phi": (transformers.PhiConfig, {**SMALL, "num_key_value_heads": 4}),
    "phi3": (transformers.Phi3Config, {**SMALL, "pad_token_id": 0}),
    # not in ARCHITECTURE_TARGETS: the default is all-linear
    "gpt_neox": (transformers.GPTNeoXConfig, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64)),
}


def tiny(arch):
    cls, fields = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cls(**fields))


def test_every_listed_architecture_has_a_default():
    assert set(ARCHITECTURES) - {"gpt_neox"} <= set(ARCHITECTURE_TARGETS)
    assert "gpt_neox" not in ARCHITECTURE_TARGETS


@pytest.mark.parametrize("method", ["smora", "mixlora"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_config_trains_two_steps(arch, method):
    base = tiny(arch)
    model = moelora.get_moelora_model(base, {"name": method})  # no target_modules: the architecture's default
    adapted = set(model.adapter_layers())
    linear = set(find_targets(tiny(arch), "all-linear"))
    assert adapted == linear  # "all": every projection of each block, never the output head
    assert not any(name.endswith(("lm_head", "embed_out")) for name in adapted)
    assert model.method_config.target_modules is not None  # the saved config names what it adapts
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B left zero init


def test_attention_default_of_expert_methods():
    model = moelora.get_moelora_model(tiny("phi3"), {"name": "lora_mixer", "experts": 2})
    assert sorted({n.split(".")[-1] for n in model.adapter_layers()}) == ["o_proj", "qkv_proj"]
    gpt2 = moelora.get_moelora_model(tiny("gpt2"), {"name": "xlora", "experts": 2, "use_trainable_adapters": True})
    assert all(".attn." in n for n in gpt2.adapter_layers())  # attn.c_proj, not mlp.c_proj


def test_peft_matching_rules():
    base = tiny("llama")
    assert find_targets(base, ["self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(base, ["layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    assert "lm_head" not in find_targets(base, "all-linear") and len(find_targets(base, "all-linear")) == 14
    assert find_targets(base, r".*\.1\.self_attn\.(q|v)_proj") == ["model.layers.1.self_attn.q_proj",
                                                                   "model.layers.1.self_attn.v_proj"]
    with pytest.raises(moelora.ConfigError, match="no linear layer named 'mlp.q_proj'"):
        find_targets(base, ["mlp.q_proj"])


@pytest.mark.parametrize("method", ["lora_mixer", "xlora"])
def test_expert_methods_take_targets_from_peft_experts(method, tmp_path):
    peft = pytest.importorskip("peft")
    folders = {}
    for name in ("a", "b"):
        expert = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
        expert.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    extra = {"stage": "plug_and_play"} if method == "lora_mixer" else {}
    model = moelora.get_moelora_model(tiny("llama"), {"name": method, "experts": folders, **extra})
    assert sorted({n.split(".")[-1] for n in model.adapter_layers()}) == ["down_proj", "q_proj"]
    assert model.method_config.target_modules == ["down_proj", "q_proj"]
