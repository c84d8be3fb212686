"""Chat formatting and batching: turn examples into token ids with prompt-masked labels.

An example is either ``{"task", "instruction", "response"}`` or ``{"task", "messages": [...]}`` (the
last assistant message is the response; everything before it is the prompt). The prompt is rendered
with the tokenizer's chat template plus the generation prompt, so training sees exactly the text that
evaluation will feed to ``generate``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moelora.errors import DataError

IGNORE_INDEX = -100  # the label value cross-entropy ignores


def end_of_turn_token(tokenizer) -> str:
    """``<|im_end|>`` for ChatML templates, else the tokenizer's eos token."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template and "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>"
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer '{tokenizer.name_or_path}' has no eos token to end responses with")
    return tokenizer.eos_token


def split_prompt_response(tokenizer, example: dict) -> tuple[str, str]:
    """Rendered prompt text (chat template + generation prompt) and the raw target response."""
    task = example.get("task", "?")
    if example.get("messages") is not None:
        msgs = list(example["messages"])
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError(f"chat example of task '{task}' has no assistant message to learn from")
        context, response = msgs[:last], msgs[last]["content"]
    else:
        if "instruction" not in example or "response" not in example:
            raise DataError(f"example of task '{task}' needs 'instruction' and 'response' (or 'messages')")
        context, response = [{"role": "user", "content": example["instruction"]}], example["response"]
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer '{tokenizer.name_or_path}' has no chat template")
    prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    return prompt, response


def build_generation_prompts(tokenizer, examples: Sequence[dict]) -> list[str]:
    """Prompt strings to feed to ``generate`` (tokenize them with ``add_special_tokens=False``)."""
    return [split_prompt_response(tokenizer, ex)[0] for ex in examples]


def encode_examples(tokenizer, examples: Sequence[dict], max_length: int) -> list[dict]:
    """Batch version of :func:`encode_example` (one fast-tokenizer call per side)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    pairs = [split_prompt_response(tokenizer, ex) for ex in examples]
    if not pairs:
        return []
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    # Prompt and completion are tokenised separately and concatenated, so the boundary is exact and
    # the prompt ids equal what evaluation feeds to generate().
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for ex, p, r in zip(examples, prompt_ids, resp_ids):
        completion = list(r) + [end_id]
        keep = max_length - len(completion)
        if keep < 1:  # need at least one prompt token to predict the first response token from
            raise DataError(
                f"response of task '{ex.get('task', '?')}' is {len(completion)} tokens (with end token), "
                f"which does not fit max_length={max_length}; raise max_length or shorten the response"
            )
        p = list(p)[-keep:]  # truncate from the left: the end of the prompt matters most
        out.append(
            {"input_ids": p + completion, "labels": [IGNORE_INDEX] * len(p) + completion, "task": ex.get("task", "")}
        )
    return out


def encode_example(tokenizer, example: dict, max_length: int) -> dict:
    """``{"input_ids", "labels", "task"}`` with labels ``-100`` on the prompt, loss on response + end token."""
    return encode_examples(tokenizer, [example], max_length)[0]


class Collator:
    """Right-pads encoded examples into LongTensors (labels padded with -100) plus the task names."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise DataError("Collator needs a pad_token_id (set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[dict]) -> dict:
        if not batch:
            raise DataError("Collator got an empty batch")
        width = max(len(ex["input_ids"]) for ex in batch)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(batch)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, ex in enumerate(batch):
            k = len(ex["input_ids"])
            input_ids[i, :k] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(ex["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "tasks": [ex.get("task", "") for ex in batch],
        }
