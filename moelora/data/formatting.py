"""Chat formatting and batching: turn examples into token ids with prompt-masked labels.

An example is either ``{"task", "instruction", "response"}`` or ``{"task", "messages": [...]}``. The
prompt is rendered with the tokenizer's chat template plus the generation prompt, so training sees exactly
the text that evaluation will feed to ``generate``. In a multi-turn chat every assistant turn is trained
(its content + end-of-turn token); system and user turns and the template's role headers are masked. For
generation (evaluation) the last assistant message is the target and everything before it the prompt.
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


PLAIN = "plain"  # an example's "template": its instruction is the prompt as it is, no chat template


def split_prompt_response(tokenizer, example: dict) -> tuple[str, str]:
    """Rendered prompt text (chat template + generation prompt) and the raw target response.

    An example with ``"template": "plain"`` is rendered without the chat template: the prompt is its
    instruction as written (LLaVA's "plain" pre-training conversations: the medium, then its caption)."""
    task = example.get("task", "?")
    template = example.get("template")
    if template is not None and template != PLAIN:
        raise DataError(f"example of task '{task}' has template {template!r}; the only one known is '{PLAIN}' "
                        "(leave it out for the tokenizer's chat template)")
    if template == PLAIN:
        if example.get("messages") is not None or "instruction" not in example or "response" not in example:
            raise DataError(f"a '{PLAIN}' example of task '{task}' needs 'instruction' and 'response' (no 'messages')")
        return example["instruction"], example["response"]
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


def chat_segments(tokenizer, example: dict) -> list[tuple[str, str]]:
    """``[(context text, response text), ...]``: one pair per trained assistant turn, in order.

    The conversation up to assistant turn k is ``context_1 + response_1 + END + ... + context_k``, where
    ``context_k`` is what the chat template renders between the end of turn k-1 and the generation prompt
    of turn k (the "\\n", the user turn, the ``<|im_start|>assistant\\n`` header). This needs the template to
    render a prefix of a chat as a prefix of the whole chat; templates that rewrite earlier turns (e.g.
    drop earlier reasoning) do not, and then only the last assistant turn is trained, as for a
    single-turn example (the earlier turns are prompt context)."""
    prompt, response = split_prompt_response(tokenizer, example)
    msgs = example.get("messages")
    # An assistant message that opens the chat answers nothing: it stays context.
    turns = [i for i, m in enumerate(msgs or []) if m.get("role") == "assistant" and i > 0]
    if len(turns) < 2:
        return [(prompt, response)]
    end = end_of_turn_token(tokenizer)
    segments, rendered = [], ""
    for i in turns:
        context = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=False)
        if not context.startswith(rendered):  # the template rewrote an earlier turn: last turn only
            return [(prompt, response)]
        content = msgs[i]["content"]
        segments.append((context[len(rendered):], content))
        rendered = context + content + end
    return segments


def encode_examples(tokenizer, examples: Sequence[dict], max_length: int) -> list[dict]:
    """Batch version of :func:`encode_example` (one fast-tokenizer call per side)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    segmented = [chat_segments(tokenizer, ex) for ex in examples]
    if not segmented:
        return []
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    # Contexts and responses are tokenised separately and concatenated, so every boundary is exact and
    # the last context's ids equal what evaluation feeds to generate() (for a single-turn example the
    # context is the whole prompt).
    flat = [seg for segs in segmented for seg in segs]
    context_ids = tokenizer([c for c, _ in flat], add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer([r for _, r in flat], add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for ex, segs in zip(examples, segmented):
        input_ids, labels = [], []
        for c, r in zip(context_ids[k : k + len(segs)], resp_ids[k : k + len(segs)]):
            completion = list(r) + [end_id]
            input_ids += list(c) + completion
            labels += [IGNORE_INDEX] * len(c) + completion
        k += len(segs)
        if len(completion) + 1 > max_length:  # at least one context token to predict the first response token from
            raise DataError(
                f"response of task '{ex.get('task', '?')}' is {len(completion)} tokens (with end token), "
                f"which does not fit max_length={max_length}; raise max_length or shorten the response"
            )
        # Truncate from the left: the end of the chat (the last response and its prompt) matters most.
        out.append({"input_ids": input_ids[-max_length:], "labels": labels[-max_length:], "task": ex.get("task", "")})
    return out


def encode_example(tokenizer, example: dict, max_length: int) -> dict:
    """``{"input_ids", "labels", "task"}`` with labels ``-100`` on the prompt, loss on every assistant
    response + its end token."""
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
