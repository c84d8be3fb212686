"""Greedy answers to chat prompts, with or without images/audio: the one generation path that evaluation
scores and that the model cards' usage snippets call.

    model, tokenizer = moelora.load("model_cards/lora-8")
    moelora.generate_answers(model, tokenizer, ["What is 12 + 30? Answer with the number only."])

A prompt is a string (one user turn), ``{"instruction": ..., "images": [...], "audio": [...]}`` (one
``<image>``/``<audio>`` marker in the instruction per item, as the multimodal suite writes them), or
``{"messages": [...]}`` (a chat; generation answers after its last message). Prompts are rendered with the
tokenizer's chat template plus the generation prompt (:func:`moelora.data.formatting.split_prompt_response`,
as in training), left-padded, batched by length, decoded greedily, and each answer is cut at the first
end-of-turn token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moelora.data.formatting import end_of_turn_token
from moelora.data.media import encode_prompts
from moelora.errors import DataError


def as_example(prompt) -> dict:
    """A prompt as an example the formatter renders: the target response (absent for a user's prompt) is ''."""
    if isinstance(prompt, str):
        return {"instruction": prompt, "response": ""}
    if not isinstance(prompt, dict):
        raise DataError(f"a prompt is a string or a dict, got {type(prompt).__name__}")
    if prompt.get("messages") is not None:
        msgs = list(prompt["messages"])
        if not msgs or msgs[-1].get("role") != "assistant":  # answer after the last message
            return {**prompt, "messages": msgs + [{"role": "assistant", "content": ""}]}
        return prompt
    if "instruction" in prompt and "response" not in prompt:
        return {**prompt, "response": ""}
    return prompt


def stop_ids(tokenizer) -> set[int]:
    """End-of-turn, eos and pad ids: an answer ends at the first of them."""
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))}
    for tid in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            ids.add(int(tid))
    return ids


def decode_answer(tokenizer, new_ids: Sequence[int], stop: set[int]) -> str:
    # Cut at the first end-of-turn/eos/pad: anything after is not the answer (or is padding).
    cut = next((i for i, t in enumerate(new_ids) if t in stop), len(new_ids))
    return tokenizer.decode(list(new_ids[:cut]), skip_special_tokens=True).strip()


def generate_answers(model, tokenizer, prompts: Sequence, max_new_tokens: int = 16, batch_size: int = 32,
                     progress: bool = False) -> list[str]:
    """Greedy answer per prompt (strings or example dicts, see the module doc), in input order.

    ``model`` is anything with a Hugging Face style ``generate`` (a plain HF model or moelora's wrapper;
    a multimodal one needs its encoders for prompts with images/audio)."""
    if isinstance(prompts, (str, dict)):
        raise DataError("generate_answers takes a list of prompts; wrap a single one in [ ]")
    examples = [as_example(p) for p in prompts]
    if not examples:
        raise DataError("generate_answers got no prompts")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError(f"tokenizer '{tokenizer.name_or_path}' has neither a pad nor an eos token")
    # Images/audio become placeholder runs sized by the model's encoders; text prompts tokenize as always.
    prompt_ids, media = encode_prompts(tokenizer, examples, getattr(model, "media_tokens", None))
    order = sorted(range(len(examples)), key=lambda i: len(prompt_ids[i]))
    stop = stop_ids(tokenizer)
    device = device_of(model)

    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", leave=False)
    answers: list[str] = [""] * len(examples)
    # Methods that route by task label (LoRA-Mixer's stage 1) get each prompt's label, as in training.
    task_labels = getattr(getattr(model, "method_config", None), "task_labels", None)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                width = max(len(prompt_ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: generation continues from the last column
                    k = len(prompt_ids[i])
                    input_ids[row, width - k :] = torch.as_tensor(prompt_ids[i], dtype=torch.long)
                    attention_mask[row, width - k :] = 1
                labels = task_labels([examples[i].get("task") for i in idx]) if task_labels else None
                routing = {"sample_labels": torch.tensor(labels, device=device)} if labels is not None else {}
                out = model.generate(
                    **routing,
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    **(media.batch(idx, width) if media is not None else {}),
                )
                seqs = out.sequences if hasattr(out, "sequences") else out
                new = seqs[:, width:].tolist()  # generate returns prompt + new tokens
                for row, i in enumerate(idx):
                    answers[i] = decode_answer(tokenizer, new[row], stop)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return answers


def device_of(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
