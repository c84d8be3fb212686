"""Static shapes for compiled / CUDA-graph steps: `data.pad_to_multiple_of` pads every batch's length up to
a bucket, and the padding is masked, so the loss (LM and router terms) is what it is without it."""

from __future__ import annotations

import pytest
import torch

import moelora
from moelora.base_models import build_tiny_tokenizer, resolve_base_model
from moelora.data.formatting import IGNORE_INDEX, Collator, encode_examples
from moelora.errors import ConfigError
from moelora.training.run_config import load_run_config

from tests.conftest import randomize_adapters

EXAMPLES = [
    {"task": "a", "instruction": "add 2 and 3", "response": "5"},
    {"task": "b", "instruction": "a much longer instruction that takes more tokens", "response": "twenty two"},
    {"task": "a", "instruction": "x", "response": "y"},
]


def _batches(multiple):
    tok = build_tiny_tokenizer()
    enc = encode_examples(tok, EXAMPLES, 128)
    return Collator(tok.pad_token_id)(enc), Collator(tok.pad_token_id, pad_to_multiple_of=multiple)(enc), enc


def test_widths_are_rounded_up_to_the_bucket_and_the_padding_is_masked():
    plain, padded, enc = _batches(64)
    longest = max(len(e["input_ids"]) for e in enc)
    assert plain["input_ids"].shape[1] == longest
    assert padded["input_ids"].shape[1] == 64 * -(-longest // 64) > longest
    extra = slice(longest, None)
    assert (padded["attention_mask"][:, extra] == 0).all() and (padded["labels"][:, extra] == IGNORE_INDEX).all()
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(padded[key][:, :longest], plain[key])


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "smora", "r": 16, "k": 4},
                                    {"name": "mixlora", "num_factors": 8, "r": 2},
                                    {"name": "lora_mixer", "experts": 2, "r": 4, "top_k": 1, "stage": "joint_stage2",
                                     "train_experts": True}])
def test_loss_and_gradients_are_unchanged_by_bucket_padding(method):
    plain, padded, _ = _batches(64)
    results = []
    for batch in (plain, padded):
        base, _ = resolve_base_model("tiny-random-llama")
        torch.manual_seed(0)
        model = moelora.get_moelora_model(base, dict(method))
        randomize_adapters(model)
        model.train()
        inputs = {k: v for k, v in batch.items() if k != "tasks"}
        out = model(**inputs)
        out.loss.backward()
        aux = out["aux_loss"] if "aux_loss" in out else torch.zeros(())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), aux.detach(), grads))
    (loss0, aux0, g0), (loss1, aux1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux1, aux0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_run_config_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base_model: tiny-random-llama\n")
    assert load_run_config(str(path), []).data.pad_to_multiple_of == 0  # default: pad to the longest example
    assert load_run_config(str(path), ["data.pad_to_multiple_of=64"]).data.pad_to_multiple_of == 64
    for bad in ("-8", "48"):  # negative; does not divide max_length=256
        with pytest.raises(ConfigError, match="pad_to_multiple_of"):
            load_run_config(str(path), [f"data.pad_to_multiple_of={bad}"])
