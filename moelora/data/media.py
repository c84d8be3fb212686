"""Images and audio in token sequences: placeholder tokens in the text, features alongside.

An example of the multimodal suite is ``{"task", "instruction", "response", "images": [...], "audio": [...]}``
whose instruction holds one ``<image>`` / ``<audio>`` marker per item. Encoding renders the chat prompt,
splits it at the markers and puts `image_tokens` (`audio_tokens`) placeholder ids in place of each marker:
the model's encoders later write their projected features over exactly those positions. A `media_mask` row
([T] ints: 0 text, 1 image, 2 audio) travels with the ids, so positions stay known under any padding; it is
named as the model's forward argument it becomes, so `transformers.Trainer` keeps the column.

The placeholder id is the tokenizer's pad id: always in the vocabulary, and what the plain base model sees
where it cannot see the picture (adapters and encoders off). Text-only examples encode exactly as
`formatting.encode_examples` does.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from moelora.data.formatting import IGNORE_INDEX, Collator, end_of_turn_token, split_prompt_response
from moelora.errors import DataError

IMAGE_MARKER, AUDIO_MARKER = "<image>", "<audio>"
TEXT, IMAGE, AUDIO = 0, 1, 2  # values of the media mask
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(AUDIO_MARKER)})")


def has_media(example: dict) -> bool:
    return bool(example.get("images")) or bool(example.get("audio"))


def encode_prompt(tokenizer, prompt: str, example: dict, media_tokens: dict[str, int] | None) -> tuple[list[int], list[int]]:
    """(ids, media kinds) of a rendered prompt, each marker expanded to its placeholder run."""
    pieces = _MARKERS.split(prompt)
    markers = pieces[1::2]
    task = example.get("task", "?")
    for marker, key in ((IMAGE_MARKER, "images"), (AUDIO_MARKER, "audio")):
        if markers.count(marker) != len(example.get(key) or []):
            raise DataError(f"example of task '{task}' has {markers.count(marker)} {marker} markers but "
                            f"{len(example.get(key) or [])} {key}")
    if markers and media_tokens is None:
        raise DataError(f"example of task '{task}' has images/audio, but the model has no encoders for them "
                        "(train with data.suite: multimodal)")
    text_ids = tokenizer(pieces[0::2], add_special_tokens=False)["input_ids"]
    ids, kinds = list(text_ids[0]), [TEXT] * len(text_ids[0])
    for marker, text in zip(markers, text_ids[1:]):
        kind, n = (IMAGE, media_tokens["image"]) if marker == IMAGE_MARKER else (AUDIO, media_tokens["audio"])
        ids += [tokenizer.pad_token_id] * n + list(text)
        kinds += [kind] * n + [TEXT] * len(text)
    return ids, kinds


def encode_multimodal_examples(tokenizer, examples: Sequence[dict], max_length: int,
                               media_tokens: dict[str, int] | None) -> list[dict]:
    """Like `formatting.encode_examples`, plus "media_mask", "images", "audio" per example (prompt-masked labels)."""
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    out = []
    for ex in examples:
        prompt, response = split_prompt_response(tokenizer, ex)
        ids, kinds = encode_prompt(tokenizer, prompt, ex, media_tokens)
        completion = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [end_id]
        cut = len(ids) + len(completion) - max_length
        if cut > 0:  # truncate the prompt from the left, as text examples, but never through a placeholder
            if any(kinds[:cut]) or cut >= len(ids):
                raise DataError(f"example of task '{ex.get('task', '?')}' needs {len(ids) + len(completion)} tokens, "
                                f"more than max_length={max_length} allows without cutting its images/audio")
            ids, kinds = ids[cut:], kinds[cut:]
        out.append({"input_ids": ids + completion, "labels": [IGNORE_INDEX] * len(ids) + completion,
                    "media_mask": kinds + [TEXT] * len(completion), "task": ex.get("task", ""),
                    "images": list(ex.get("images") or []), "audio": list(ex.get("audio") or [])})
    return out


def stack_media(rows: Sequence[dict], media_masks: torch.Tensor) -> dict:
    """{"media_mask", "images", "audio"} for a batch: features in row order, then marker order."""
    out = {"media_mask": media_masks}
    for key in ("images", "audio"):
        items = [x for row in rows for x in row.get(key) or []]
        if items:
            out[key] = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in items])
    return out


class MultimodalCollator(Collator):
    """`Collator` (right padding) plus the media mask and the stacked image/audio features."""

    def __call__(self, batch: Sequence[dict]) -> dict:
        out = super().__call__(batch)
        mask = torch.zeros_like(out["input_ids"])
        for i, ex in enumerate(batch):
            kinds = ex.get("media_mask") or [TEXT] * len(ex["input_ids"])
            mask[i, :len(kinds)] = torch.as_tensor(kinds, dtype=torch.long)
        return {**out, **stack_media(batch, mask)}


class PromptMedia:
    """The media of evaluation prompts, turned into generate() inputs for a left-padded batch."""

    def __init__(self, kinds: list[list[int]], examples: Sequence[dict]):
        self.kinds, self.examples = kinds, examples

    def batch(self, rows: Sequence[int], width: int) -> dict:
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            k = self.kinds[i]
            mask[r, width - len(k):] = torch.as_tensor(k, dtype=torch.long)
        return stack_media([self.examples[i] for i in rows], mask)


def encode_prompts(tokenizer, examples: Sequence[dict], media_tokens: dict[str, int] | None):
    """(prompt ids, PromptMedia or None) for generation; text-only lists tokenize exactly as before."""
    prompts = [split_prompt_response(tokenizer, ex)[0] for ex in examples]
    if not any(has_media(ex) for ex in examples):
        return tokenizer(prompts, add_special_tokens=False)["input_ids"], None
    encoded = [encode_prompt(tokenizer, p, ex, media_tokens) for p, ex in zip(prompts, examples)]
    return [ids for ids, _ in encoded], PromptMedia([kinds for _, kinds in encoded], examples)
