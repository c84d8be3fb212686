"""MoELoRAModel plumbing shared by all methods: routing context, aux losses, target matching."""

import pytest
import torch

import moelora


def test_router_aux_losses_are_added_to_the_lm_loss(tiny_llama, batch):
    model = moelora.get_moelora_model(tiny_llama[0], moelora.SMoRAConfig(r=8, k=2))
    seen = {}
    layer = next(iter(model.adapter_layers().values()))

    def add_aux(module, args, out):
        seen["labels"] = model.context.sample_labels
        model.context.aux_losses.append(torch.tensor(0.25))

    layer.register_forward_hook(add_aux)
    plain = model.base_model(**batch, labels=batch["input_ids"]).loss  # base forward: no context reset
    model.context.aux_losses.clear()
    out = model(**batch, labels=batch["input_ids"], sample_labels=torch.tensor([1, 0]))
    assert float(out.aux_loss) == 0.25
    torch.testing.assert_close(out.loss, plain + 0.25)
    assert seen["labels"].tolist() == [1, 0]


def test_regex_target_modules(tiny_llama):
    model = moelora.get_moelora_model(tiny_llama[0], moelora.LoRAConfig(r=2, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(model.adapter_layers()) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_unknown_target_module_is_named(tiny_llama):
    with pytest.raises(moelora.ConfigError, match="q_prj.*did you mean 'q_proj'"):
        moelora.get_moelora_model(tiny_llama[0], moelora.LoRAConfig(r=2, target_modules=["q_prj"]))


def test_router_stats_report_load_and_dead_ranks(tiny_llama, batch):
    model = moelora.get_moelora_model(tiny_llama[0], moelora.SMoRAConfig(r=8, k=2))
    model(**batch)
    stats = model.router_stats()
    assert len(stats) == len(model.adapter_layers())
    s = next(iter(stats.values()))
    assert s["tokens"] == int(batch["attention_mask"].sum()) and len(s["load"]) == 8
    assert abs(sum(s["load"]) - 1.0) < 1e-5 and 0.0 <= s["load_entropy"] <= 1.0
    assert s["dead"] == [i for i, f in enumerate(s["load"]) if f == 0]
    model.reset_router_stats()
    assert next(iter(model.router_stats().values()))["tokens"] == 0
