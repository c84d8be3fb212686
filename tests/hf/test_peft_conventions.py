"""PEFT's conventions: its key names in configs, exports that AutoPeftModelForCausalLM loads, the zoo in PEFT format."""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.conftest import randomize_adapters
from tests.processes import REPO

peft = pytest.importorskip("peft")


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["lora", "smora", "lora_mixer"])
def test_lora_alpha_and_lora_dropout_are_aliases(method):
    cfg = moelora.config_from_dict({"name": method, "lora_alpha": 32, "lora_dropout": 0.1})
    assert (cfg.alpha, cfg.dropout) == (32.0, 0.1)
    assert "lora_alpha" not in cfg.to_dict()  # saved under moelora's own names
    with pytest.raises(moelora.ConfigError, match="method.lora_alpha.*PEFT's name for 'alpha'"):
        moelora.config_from_dict({"name": method, "alpha": 16, "lora_alpha": 32})


def test_peft_export_of_a_local_base_loads_with_auto_peft_model(tmp_path, batch):
    """format='peft' names the base folder and writes a card: AutoPeftModelForCausalLM needs nothing else."""
    tiny, tokenizer = resolve_base_model("tiny-random-llama")
    tiny.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base, _ = resolve_base_model(str(tmp_path / "base"))
    ours = moelora.get_moelora_model(base, moelora.LoRAConfig(r=4, alpha=8, target_modules=["self_attn.q_proj", "v_proj"]))
    randomize_adapters(ours, seed=3, scale=0.1)
    want = _logits(ours, batch)
    ours.save_pretrained(tmp_path / "export", format="peft")

    cfg = moelora.checkpoint.read_json(tmp_path / "export" / "adapter_config.json")
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\n") and f"base_model: {(tmp_path / 'base').resolve()}" in card
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    torch.testing.assert_close(_logits(theirs, batch), want, atol=1e-5, rtol=0)


def test_peft_export_of_a_partial_selection_stays_exact(tmp_path, batch):
    """Leaf names would select more layers than a regex did: the export then names the modules exactly."""
    base, _ = resolve_base_model("tiny-random-llama")
    ours = moelora.get_moelora_model(base, moelora.LoRAConfig(r=2, target_modules=r"model\.layers\.0\..*q_proj"))
    randomize_adapters(ours, seed=4, scale=0.1)
    want = _logits(ours, batch)
    ours.save_pretrained(tmp_path / "export", format="peft")
    theirs = peft.PeftModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "export")
    assert sum("lora_A" in n for n, _ in theirs.named_parameters()) == 1
    torch.testing.assert_close(_logits(theirs, batch), want, atol=1e-5, rtol=0)


def test_plug_and_play_over_fresh_experts_is_refused():
    with pytest.raises(moelora.ConfigError, match=r"method.experts.*plug_and_play.*fresh"):
        moelora.config_from_dict({"name": "lora_mixer", "experts": 3, "stage": "plug_and_play"})


@pytest.mark.integration
@pytest.mark.parametrize("card", ["lora-8", "lora-64"])
def test_zoo_peft_copy_gives_the_cards_logits_in_peft(card, batch):
    model, tokenizer = moelora.load(REPO / "model_cards" / card)
    ids = tokenizer(["12 + 30 =", "sort: 3 1 2"], return_tensors="pt", padding=True)
    want = _logits(model, dict(ids))
    base, _ = resolve_base_model("smollm2-135m-instruct")
    theirs = peft.PeftModel.from_pretrained(base, REPO / "model_cards" / card / "peft")
    torch.testing.assert_close(_logits(theirs, dict(ids)), want, atol=1e-4, rtol=0)
