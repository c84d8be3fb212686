"""Our LoRA against PEFT's, the peer: same weights give the same logits (atol 1e-5), both directions."""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.conftest import randomize_adapters

peft = pytest.importorskip("peft")


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("base_name,targets,rslora", [
    ("tiny-random-llama", ["q_proj", "v_proj", "down_proj"], False),
    ("tiny-random-llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    ("tiny-random-gpt2", ["c_attn", "c_proj", "c_fc"], False),
])
def test_peft_saved_adapter_loads_with_same_logits(tmp_path, batch, base_name, targets, rslora):
    base, _ = resolve_base_model(base_name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                          fan_in_fan_out=base_name.endswith("gpt2"))
    peft_model = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    want = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = moelora.MoELoRAModel.from_pretrained(resolve_base_model(base_name)[0], tmp_path / "peft")
    assert ours.method_config.method_name == "lora" and ours.method_config.use_rslora == rslora
    got = _logits(ours, batch)
    assert (got - _logits(resolve_base_model(base_name)[0], batch)).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base_name,targets", [
    ("tiny-random-llama", ["q_proj", "v_proj", "up_proj"]),
    ("tiny-random-gpt2", ["c_attn", "c_fc"]),
])
def test_peft_format_export_loads_in_peft_with_same_logits(tmp_path, batch, base_name, targets):
    ours = moelora.get_moelora_model(resolve_base_model(base_name)[0],
                                     moelora.LoRAConfig(r=4, alpha=12, target_modules=targets))
    randomize_adapters(ours, seed=5, scale=0.1)
    want = _logits(ours, batch)
    ours.save_pretrained(tmp_path / "export", format="peft")

    theirs = peft.PeftModel.from_pretrained(resolve_base_model(base_name)[0], tmp_path / "export")
    torch.testing.assert_close(_logits(theirs, batch), want, atol=1e-5, rtol=0)


def test_peft_export_refuses_routed_methods(tmp_path, tiny_llama):
    model = moelora.get_moelora_model(tiny_llama[0], moelora.SMoRAConfig(r=8, k=2))
    with pytest.raises(moelora.CheckpointError, match="no PEFT equivalent"):
        model.save_pretrained(tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_unsupported_peft_options_are_refused(tmp_path, tiny_llama):
    base, _ = tiny_llama
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "dora")
    with pytest.raises(moelora.CheckpointError, match="use_dora"):
        moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "dora")


BELOW_THE_METHODS = ["peft_compat.py", "model.py", "adapter_folder.py", "layer.py", "routing.py", "experts.py",
                     "registry.py"]


@pytest.mark.parametrize("module", BELOW_THE_METHODS)
def test_shared_modules_name_no_method(module):
    """The codec, the model and the shared layer code never import a method or dispatch on a method's name:
    methods register what PEFT folders load as and what they export (moelora/registry.py)."""
    import ast
    from pathlib import Path

    from moelora.registry import METHODS

    tree = ast.parse((Path(moelora.__file__).parent / module).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m == "methods" or m.startswith("methods.") or ".methods" in m], imported
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & set(METHODS)


def test_a_peft_type_nobody_registered_is_refused_naming_the_known_ones(tmp_path, tiny_llama):
    from moelora.checkpoint import write_json

    write_json(tmp_path / "adapter_config.json", {"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(moelora.CheckpointError, match="peft_type 'IA3' is not supported here.*'LORA', 'XLORA'"):
        moelora.MoELoRAModel.from_pretrained(tiny_llama[0], tmp_path)
