"""Chat formatting: prompt-masked labels, left truncation, chat rows, and the collator."""

import pytest
import torch

from moelora.base_models import build_tiny_tokenizer
from moelora.data.formatting import (
    IGNORE_INDEX,
    Collator,
    build_generation_prompts,
    encode_example,
    encode_examples,
    end_of_turn_token,
)
from moelora.data.tasks import build_task_suite
from moelora.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _labelled(ex):
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_labels_cover_exactly_response_and_end_token(tok):
    example = {"task": "add", "instruction": "What is 12 + 30?", "response": "42"}
    enc = encode_example(tok, example, max_length=128)
    assert enc["task"] == "add"
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert tok.decode(_labelled(enc)) == "42<|im_end|>"
    # Labels are a suffix of input_ids, so the prompt is everything before it and it is masked.
    n = len(_labelled(enc))
    assert enc["input_ids"][-n:] == _labelled(enc)
    assert all(t == IGNORE_INDEX for t in enc["labels"][:-n])
    prompt = tok.decode(enc["input_ids"][:-n])
    assert prompt == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == build_generation_prompts(tok, [example])[0]


def test_batch_encoding_matches_single(tok):
    train, _ = build_task_suite("all", 5, 0, seed=0)
    batch = encode_examples(tok, train, max_length=128)
    assert batch == [encode_example(tok, ex, 128) for ex in train]
    for ex, enc in zip(train, batch):
        assert tok.decode(_labelled(enc)) == ex["response"] + "<|im_end|>"


def test_left_truncation_keeps_response(tok):
    example = {"task": "long", "instruction": "x" * 200, "response": "answer"}
    enc = encode_example(tok, example, max_length=32)
    assert len(enc["input_ids"]) == 32
    assert tok.decode(_labelled(enc)) == "answer<|im_end|>"
    # The kept prompt is the *end* of the prompt: it still ends with the generation prompt.
    assert tok.decode(enc["input_ids"][: 32 - len(_labelled(enc))]).endswith("<|im_start|>assistant\n")


def test_response_longer_than_max_length_names_task(tok):
    with pytest.raises(DataError, match="task 'essay'"):
        encode_example(tok, {"task": "essay", "instruction": "hi", "response": "y" * 40}, max_length=16)


def test_chat_messages_train_only_last_assistant(tok):
    example = {
        "task": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
    }
    enc = encode_example(tok, example, max_length=256)
    assert tok.decode(_labelled(enc)) == "Paris<|im_end|>"
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>assistant\nHello<|im_end|>\n" in text  # earlier turn is context, not loss
    prompt = build_generation_prompts(tok, [example])[0]
    assert prompt.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DataError, match="no assistant"):
        encode_example(tok, {"task": "c", "messages": [{"role": "user", "content": "q"}]}, 64)


def test_end_token_falls_back_to_eos_without_chatml():
    tok = build_tiny_tokenizer()
    assert end_of_turn_token(tok) == "<|im_end|>"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn_token(tok) == "<|endoftext|>"
    enc = encode_example(tok, {"task": "t", "instruction": "q", "response": "a"}, 32)
    assert tok.decode(_labelled(enc)) == "a<|endoftext|>"


def test_collator_pads_right(tok):
    examples = [
        {"task": "a", "instruction": "short", "response": "1"},
        {"task": "b", "instruction": "a much longer instruction here", "response": "22"},
    ]
    enc = encode_examples(tok, examples, 128)
    batch = Collator(tok.pad_token_id)(enc)
    n0, n1 = len(enc[0]["input_ids"]), len(enc[1]["input_ids"])
    width = max(n0, n1)
    assert batch["tasks"] == ["a", "b"]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, width) and batch[key].dtype == torch.long
    assert batch["input_ids"][0, :n0].tolist() == enc[0]["input_ids"]
    assert (batch["input_ids"][0, n0:] == tok.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (width - n0)
    assert batch["attention_mask"][1].sum() == n1
    padded = Collator(tok.pad_token_id, pad_to_multiple_of=16)(enc)
    assert padded["input_ids"].shape[1] % 16 == 0
