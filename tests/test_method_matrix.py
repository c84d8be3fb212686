"""The shared matrix: every registered method through the same save/load/train/config invariants.

The rows (one small config per method, and the inputs of rows that need more than token ids) live in
`tests/method_cases.py`, which every test that loops over the methods reads.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from tests.conftest import randomize_adapters
from tests.method_cases import METHOD_CASES, ROW_INPUTS  # noqa: F401  (ROW_INPUTS: also read by gpu_checks)
from tests.processes import REPO

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
SAVED_FILES = ["adapter_model.safetensors", "manifest.json", "moelora_config.json"]


def _batch(method, model, batch):
    row = ROW_INPUTS.get(method)
    return row["batch"](model, batch) if row else batch


def _base_view(method, model, batch):
    row = ROW_INPUTS.get(method)
    return row["base_inputs"](model, batch) if row else batch


def _text_only(batch):
    """What the plain base LM reads: the token ids (a multimodal model with adapters off reads the same)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def test_every_registered_method_has_a_row():
    assert set(moelora.METHODS) == set(METHOD_CASES)


def _model(name, base_name="tiny-random-llama", **extra):
    base, _ = resolve_base_model(base_name)
    torch.manual_seed(0)
    fields = {"name": name, **METHOD_CASES[name], **extra}
    if base_name.endswith("gpt2"):
        fields["target_modules"] = GPT2_TARGETS
    return moelora.get_moelora_model(base, fields, base_model_id=base_name)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", METHOD_CASES)
def test_fresh_adapter_is_identity_and_base_is_frozen(method, batch):
    model = _model(method)
    batch = _batch(method, model, batch)
    base_logits = _logits(resolve_base_model("tiny-random-llama")[0], _base_view(method, model, batch))
    torch.testing.assert_close(_logits(model, batch), base_logits)  # B = 0 at init
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or "embed" in n)
    assert model.trainable_parameters()


@pytest.mark.parametrize("method", METHOD_CASES)
def test_train_step_changes_only_adapter(method, batch):
    model = _model(method)
    batch = _batch(method, model, batch)
    randomize_adapters(model, seed=1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("base_name", ["tiny-random-llama", "tiny-random-gpt2"])
@pytest.mark.parametrize("method", METHOD_CASES)
def test_save_load_in_fresh_process_gives_identical_logits(method, base_name, batch, tmp_path):
    model = _model(method, base_name)
    batch = _batch(method, model, batch)
    randomize_adapters(model, seed=2)
    model.update_router_state()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ROW_INPUTS.get(method, {}).get("files", SAVED_FILES)
    torch.save(batch, tmp_path / "batch.pt")  # test-only input exchange; checkpoints never use pickle
    script = textwrap.dedent(f"""
        import torch, moelora
        from moelora.base_models import resolve_base_model
        from safetensors.torch import save_file
        batch = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)
        model = moelora.MoELoRAModel.from_pretrained(resolve_base_model({base_name!r})[0], {str(tmp_path / 'adapter')!r})
        with torch.no_grad():
            save_file({{"logits": model(**batch).logits}}, {str(tmp_path / 'out.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", METHOD_CASES)
def test_loading_onto_a_different_base_fails_clearly(method, tmp_path):
    model = _model(method)
    model.save_pretrained(tmp_path / "adapter")
    other, _ = resolve_base_model("tiny-random-llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # same architecture, other weights
    with pytest.raises(moelora.CheckpointError, match="different base model"):
        moelora.MoELoRAModel.from_pretrained(other, tmp_path / "adapter")
    with pytest.raises(moelora.CheckpointError, match="different base model"):
        moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-gpt2")[0], tmp_path / "adapter")


@pytest.mark.parametrize("method", METHOD_CASES)
def test_config_roundtrip_and_unknown_key(method):
    cfg = moelora.config_from_dict({"name": method, **METHOD_CASES[method]})
    assert moelora.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(moelora.ConfigError, match="unknown key"):
        moelora.config_from_dict({"name": method, "rank": 4})
    with pytest.raises(moelora.ConfigError, match="target_modules"):
        _model(method, target_modules=["q_projj"])


@pytest.mark.parametrize("method", METHOD_CASES)
def test_merge_follows_the_method(method, batch):
    model = _model(method)
    batch = _batch(method, model, batch)
    randomize_adapters(model, seed=4)
    want = _logits(model, batch)
    if moelora.get_method(method).layer_cls.mergeable:
        merged = model.merge_and_unload()
        torch.testing.assert_close(_logits(merged, batch), want, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(moelora.MoeloraError, match="cannot be merged"):
            model.merge_and_unload()


@pytest.mark.parametrize("method", METHOD_CASES)
def test_disable_adapter_gives_base_logits(method, batch):
    model = _model(method)
    batch = _batch(method, model, batch)
    randomize_adapters(model, seed=6)
    base_logits = _logits(resolve_base_model("tiny-random-llama")[0], _text_only(batch))
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), base_logits)
    assert not torch.allclose(_logits(model, batch), base_logits)


@pytest.mark.parametrize("method", METHOD_CASES)
def test_backends_give_same_outputs_and_gradients(method, batch, monkeypatch):
    """The Triton kernel (interpreted on CPU) and the torch path agree for every method's layers."""
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOELORA_BACKEND", backend)
        model = _model(method)
        randomize_adapters(model, seed=8)
        model.train()
        out = model(**_batch(method, model, batch), labels=_batch(method, model, batch)["input_ids"])
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad for p in model.trainable_parameters()]))
    (logits_t, grads_t), (logits_k, grads_k) = results
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-5)
    for gk, gt in zip(grads_k, grads_t):
        torch.testing.assert_close(gk, gt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHOD_CASES)
def test_adapted_layers_never_make_the_host_wait(method, batch):
    """No op in a training forward+backward (and router update) whose result the host must read (item, bool,
    equal, bincount, boolean-mask indexing): on a GPU each stalls kernel issue, here once per adapted layer.
    Only the model's own input checks may, a fixed few per step however many layers are adapted."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from host_ops import HostOpCounter

    from moelora.layer import AdapterLayer

    model = _model(method)
    model.train()
    inputs = _batch(method, model, batch)  # right padding: the token-mask paths run too
    update = getattr(model, "update_router_state", lambda: None)
    for counting in (False, True):  # a warm-up step first (lazily created state)
        with HostOpCounter(trace=True) if counting else torch.enable_grad() as counter:
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            update()
    with HostOpCounter() as base_counter, torch.no_grad():  # what transformers itself reads (padding masks)
        resolve_base_model("tiny-random-llama")[0](**_base_view(method, model, inputs))
    assert sum(isinstance(m, AdapterLayer) for m in model.modules()) >= 4  # one sync per layer would show
    passes = 2 if method == "xlora" else 1  # X-LoRA runs the base model twice per forward
    assert counter.total_syncs <= passes * (base_counter.total_syncs + 1), dict(counter.where)  # +1: token ids
