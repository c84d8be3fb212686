"""Exact-match evaluation with a scripted fake model, a real tiny model, and the results table."""

import torch

from moelora.base_models import build_tiny_tokenizer, resolve_base_model
from moelora.data.formatting import build_generation_prompts
from moelora.data.tasks import build_task_suite
from moelora.evaluation import evaluate_exact_match, format_results_table


class FakeModel:
    """Answers correctly for prompts in `answers`, "wrong" otherwise; records calls."""

    def __init__(self, tokenizer, answers: dict):
        self.tok = tokenizer
        self.answers = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]): a for p, a in answers.items()}
        self.training = True
        self.calls = []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not self.training and not do_sample and not torch.is_grad_enabled()
        self.calls.append(input_ids.shape)
        assert (attention_mask[:, -1] == 1).all()  # left padded
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tuple(ids[mask.bool()].tolist())
            text = self.answers.get(prompt, "wrong") + "<|im_end|>"
            new = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            new += [pad_token_id] * (max_new_tokens - len(new))
            rows.append(ids.tolist() + new)
        return torch.tensor(rows)


def test_half_right_gives_fifty_percent():
    tok = build_tiny_tokenizer()
    _, evals = build_task_suite(["add", "sort_asc", "reverse_word"], 0, 4, seed=0)
    prompts = build_generation_prompts(tok, evals)
    right = {}
    for task in ("add", "sort_asc", "reverse_word"):
        idx = [i for i, e in enumerate(evals) if e["task"] == task][:2]  # two of four per task
        right.update({prompts[i]: " " + evals[i]["response"] + " " for i in idx})  # padded with spaces: stripped
    model = FakeModel(tok, right)
    res = evaluate_exact_match(model, tok, evals, batch_size=5, max_new_tokens=16, progress=False)
    assert res["per_task"] == {"add": 0.5, "sort_asc": 0.5, "reverse_word": 0.5}
    assert res["average"] == 0.5
    assert res["n"] == {"add": 4, "sort_asc": 4, "reverse_word": 4}
    assert model.training  # restored
    assert len(model.calls) == 3 and all(shape[0] <= 5 for shape in model.calls)
    # Predictions come back in input order, aligned with their examples.
    for ex, pred in zip(evals, res["predictions"]):
        assert pred["instruction"] == ex["instruction"] and pred["target"] == ex["response"]
        assert pred["prediction"] in (ex["response"], "wrong")


def test_real_tiny_model_runs():
    model, tok = resolve_base_model("tiny-random-llama")
    _, evals = build_task_suite(["add", "last_letter"], 0, 3, seed=0)
    res = evaluate_exact_match(model, tok, evals, batch_size=4, max_new_tokens=4, progress=False)
    assert set(res["per_task"]) == {"add", "last_letter"}
    assert 0.0 <= res["average"] <= 1.0 and len(res["predictions"]) == 6


def test_results_table_format():
    base = {"per_task": {"add": 0.25, "sort_asc": 0.0}, "average": 0.125}
    trained = {"per_task": {"add": 1.0, "sort_asc": 2 / 3}, "average": 5 / 6}
    table = format_results_table({"base": base, "trained": trained})
    lines = table.splitlines()
    assert lines[0] == "| task | base | trained |"
    assert lines[1].startswith("|---|")
    assert lines[2] == "| add | 25.0 | 100.0 |"
    assert lines[3] == "| sort_asc | 0.0 | 66.7 |"
    assert lines[4] == "| average | 12.5 | 83.3 |"
    assert len(lines) == 5
