"""Response-only logits (moelora/supervised_loss.py): the LM head runs on supervised positions only, and the
loss and every gradient equal those of full logits."""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from moelora.supervised_loss import supervised_positions
from tests.conftest import randomize_adapters
from tests.method_cases import TEXT_METHODS
from tests.test_method_matrix import GPT2_TARGETS, METHOD_CASES, _batch


def _labels(inputs):
    """Instruction-shaped labels: the prompt (first 5 tokens) and padding masked, as the collator does."""
    labels = inputs["input_ids"].clone()
    labels[:, :5] = -100
    if "attention_mask" in inputs:
        labels[inputs["attention_mask"] == 0] = -100
    return labels


def _run(model, inputs, **extra):
    for p in model.trainable_parameters():
        p.grad = None
    torch.manual_seed(7)  # the same dropout masks in both runs (GPT-2, X-LoRA's classifier, the speech LoRA)
    out = model(**inputs, **extra)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.trainable_parameters()]


# GPT-2 (Conv1D projections, a tied head, dropout) for every text method; the multimodal row's batch is built
# for the Llama tokenizer.
CASES = [(m, "tiny-random-llama") for m in METHOD_CASES] + [(m, "tiny-random-gpt2") for m in TEXT_METHODS]


@pytest.mark.parametrize("method,base_name", CASES)
def test_supervised_positions_give_the_full_logits_loss_and_gradients(method, base_name, batch):
    base, _ = resolve_base_model(base_name)
    torch.manual_seed(0)
    extra = {"target_modules": GPT2_TARGETS} if base_name.endswith("gpt2") else {}
    model = moelora.get_moelora_model(base, {"name": method, **METHOD_CASES[method], **extra})
    randomize_adapters(model, seed=5)
    model.train()
    inputs = _batch(method, model, batch)
    labels = _labels(inputs)
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)  # as train.py: the step's token count
    full, full_grads = _run(model, inputs, labels=labels, num_items_in_batch=n_items)
    positions = supervised_positions(labels)
    part, part_grads = _run(model, inputs, labels=labels, num_items_in_batch=n_items, supervised_positions=positions)
    assert part.logits.shape == (1, positions.numel(), full.logits.shape[-1])  # the head ran on those rows only
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(part_grads, full_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the rows are the full logits at those positions
    torch.testing.assert_close(part.logits[0], full.logits.reshape(-1, full.logits.shape[-1])[positions],
                               rtol=1e-5, atol=1e-5)


def test_without_num_items_the_loss_is_the_mean_over_supervised_tokens(batch):
    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, {"name": "lora", "r": 4})
    labels = _labels(batch)
    want = model(**batch, labels=labels).loss
    got = model(**batch, labels=labels, supervised_positions=supervised_positions(labels)).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_evaluation_forward_is_unchanged(batch):
    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, {"name": "smora", "r": 8, "k": 2})
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
        model(**batch, labels=_labels(batch), supervised_positions=supervised_positions(_labels(batch)))
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape  # the head's row selection is off again
