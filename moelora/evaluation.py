"""Exact-match evaluation by greedy generation, eval loss / perplexity, and a Markdown table to compare runs.

``model`` may be any object with a Hugging Face style ``generate(input_ids, attention_mask, ...)``
(a plain HF model or moelora's wrapper). Prompts are built exactly as in training
(:mod:`moelora.data.formatting`), left-padded, and batched in order of length to minimise padding, by
:func:`moelora.generation.generate_answers` (the model cards' usage snippets call the same function).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from moelora.data.formatting import Collator, encode_examples, split_prompt_response
from moelora.errors import DataError
from moelora.generation import device_of as _device_of
from moelora.generation import generate_answers


def evaluate_exact_match(
    model, tokenizer, examples: Sequence[dict], batch_size: int = 32, max_new_tokens: int = 16, progress: bool = True
) -> dict:
    """Greedy-generate an answer per example and score exact match against its response.

    Returns ``{"per_task": {task: em}, "average": macro mean over tasks, "n": {task: count},
    "predictions": [{"task", "instruction", "target", "prediction"}, ...]}`` (predictions in input order).
    """
    if not examples:
        raise DataError("evaluate_exact_match got no examples")
    pairs = [split_prompt_response(tokenizer, ex) for ex in examples]
    answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, progress)

    hits: dict[str, list[int]] = {}
    predictions = []
    for ex, (_, target), pred in zip(examples, pairs, answers):
        task = ex.get("task", "")
        hits.setdefault(task, []).append(int(pred == target.strip()))
        instruction = ex.get("instruction") or _last_user_text(ex)
        predictions.append({"task": task, "instruction": instruction, "target": target.strip(), "prediction": pred})
    per_task = {t: sum(h) / len(h) for t, h in hits.items()}
    return {
        "per_task": per_task,
        "average": sum(per_task.values()) / len(per_task),
        "n": {t: len(h) for t, h in hits.items()},
        "predictions": predictions,
    }


def evaluate_loss(model, tokenizer, examples: Sequence[dict], batch_size: int = 8, max_length: int = 256) -> dict:
    """Training's loss on held-out examples: mean cross-entropy over response tokens (every assistant turn
    + its end token, labels as in training; prompts masked), and its exponential, the perplexity.

    Returns ``{"loss", "perplexity", "tokens", "per_task": {task: loss}, "sums": {task: [CE sum, tokens]}}``
    (the sums let shares of the tasks scored on different processes be merged exactly)."""
    from moelora.supervised_loss import next_token_targets, supervised_positions

    if not examples:
        raise DataError("evaluate_loss got no examples")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_examples(tokenizer, examples, max_length)
    collate = Collator(pad_id)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # little padding
    task_labels = getattr(getattr(model, "method_config", None), "task_labels", None)
    moelora_head = getattr(getattr(model, "head_rows", None), "installed", False)
    device = _device_of(model)
    sums: dict[str, list[float]] = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                batch = collate([encoded[i] for i in order[s : s + batch_size]])
                labels = batch["labels"]
                positions = supervised_positions(labels)
                inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                          "labels": labels.to(device)}  # labels: routers that read the prompt mask see it as in training
                routed = task_labels(batch["tasks"]) if task_labels else None
                if routed is not None:
                    inputs["sample_labels"] = torch.tensor(routed, device=device)
                if moelora_head:  # the head only at supervised positions, as in training
                    inputs["supervised_positions"] = positions.to(device)
                logits = model(**inputs).logits
                flat = logits.reshape(-1, logits.shape[-1])
                if flat.shape[0] != positions.numel():  # full logits (a plain model): pick the supervised rows
                    flat = flat.index_select(0, positions.to(flat.device))
                targets = next_token_targets(labels).index_select(0, positions).to(flat.device)
                ce = F.cross_entropy(flat.float(), targets, reduction="none").cpu()
                rows = (positions // labels.shape[1]).tolist()
                for row, value in zip(rows, ce.tolist()):
                    acc = sums.setdefault(batch["tasks"][row], [0.0, 0])
                    acc[0] += value
                    acc[1] += 1
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return loss_summary(sums)


def loss_summary(sums: dict[str, list[float]]) -> dict:
    """Token-mean losses (per task and overall) and perplexity from per-task ``[CE sum, tokens]``."""
    total, tokens = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": int(tokens),
            "per_task": {t: v[0] / max(v[1], 1) for t, v in sums.items()}, "sums": sums}


def _last_user_text(ex: dict) -> str:
    msgs = ex.get("messages") or []
    users = [m.get("content", "") for m in msgs if m.get("role") == "user"]
    return users[-1] if users else ""


def format_results_table(results_by_name: dict[str, dict]) -> str:
    """Markdown table: one row per task (+ "average"), one column per named result, EM in % (1 decimal)."""
    if not results_by_name:
        raise DataError("format_results_table got no results")
    names = list(results_by_name)
    tasks: list[str] = []
    for res in results_by_name.values():  # union of tasks, in first-seen order
        tasks += [t for t in res.get("per_task", {}) if t not in tasks]

    def cell(value) -> str:
        return "–" if value is None else f"{100.0 * value:.1f}"

    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(results_by_name[n].get("per_task", {}).get(t)) for n in names) + " |")
    lines.append("| average | " + " | ".join(cell(results_by_name[n].get("average")) for n in names) + " |")
    # Eval loss (response tokens, nats) and perplexity, when a result has them (not a percentage).
    for key, label, fmt in (("loss", "eval loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}")):
        if any(results_by_name[n].get(key) is not None for n in names):
            values = [results_by_name[n].get(key) for n in names]
            lines.append(f"| {label} | " + " | ".join("–" if v is None else fmt.format(v) for v in values) + " |")
    return "\n".join(lines)
