"""Eval loss / perplexity: training's loss (response tokens only) on held-out examples, per task and overall."""

import math

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from moelora.data.formatting import Collator, encode_examples
from moelora.evaluation import evaluate_loss, format_results_table, loss_summary

EXAMPLES = [
    {"task": "qa", "instruction": "Capital of France?", "response": "Paris"},
    {"task": "qa", "instruction": "Add 2 and 3", "response": "5"},
    {"task": "chat", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]},
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    base, tok = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, moelora.SMoRAConfig(r=4, k=2))
    with torch.no_grad():  # non-zero B: the adapter changes the loss
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model, tok


def _training_loss(model, tok, examples):
    """The loss training computes on one batch of these examples (token mean over response tokens)."""
    batch = Collator(tok.pad_token_id)(encode_examples(tok, examples, 128))
    batch.pop("tasks")
    with torch.no_grad():
        return float(model(**batch).loss), int((batch["labels"][:, 1:] != -100).sum())


def test_eval_loss_is_trainings_loss_per_task_and_overall(tiny):
    model, tok = tiny
    model.train()
    res = evaluate_loss(model, tok, EXAMPLES, batch_size=2, max_length=128)  # batches mix tasks
    assert model.training  # restored
    loss, tokens = _training_loss(model, tok, EXAMPLES)
    assert res["tokens"] == tokens
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    for task in ("qa", "chat"):
        part = [ex for ex in EXAMPLES if ex["task"] == task]
        assert res["per_task"][task] == pytest.approx(_training_loss(model, tok, part)[0], rel=1e-5)
    # Both assistant turns of the chat count: its tokens are those of "Hello there" and "See you" + 2 end tokens.
    n_chat = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in ("Hello there", "See you"))
    assert res["sums"]["chat"][1] == n_chat
    # The base alone (a plain HF model: full logits) scores differently from the adapter, as its own loss says.
    with model.disable_adapter():
        base_res = evaluate_loss(model, tok, EXAMPLES, batch_size=3, max_length=128)
        base_loss = _training_loss(model, tok, EXAMPLES)[0]
        plain = evaluate_loss(model.base_model, tok, EXAMPLES, batch_size=1, max_length=128)  # the HF model itself
    assert base_res["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert plain["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert abs(base_res["loss"] - res["loss"]) > 1e-4


def test_loss_summary_merges_shares_and_table_shows_loss():
    merged = loss_summary({"a": [2.0, 2], "b": [6.0, 2]})
    assert merged["loss"] == 2.0 and merged["per_task"] == {"a": 1.0, "b": 3.0}
    assert merged["perplexity"] == pytest.approx(math.exp(2.0))
    table = format_results_table({"base": {"per_task": {"a": 0.5}, "average": 0.5, "loss": 2.0, "perplexity": 7.389},
                                  "old": {"per_task": {"a": 1.0}, "average": 1.0}})
    assert table.splitlines()[-2:] == ["| eval loss | 2.0000 | – |", "| perplexity | 7.39 | – |"]
