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


CHAT = {
    "task": "chat",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
}


def test_chat_trains_every_assistant_turn_token_by_token(tok):
    enc = encode_example(tok, CHAT, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    # The whole chat, as the template renders it (each turn ends with <|im_end|>, then "\n").
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(ids) + "\n" == full
    # Expected mask, built piece by piece: each piece's tokens either all supervised or all -100.
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>", True),
        ("\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris<|im_end|>", True),
    ]
    expected = []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        expected += [(t, t if trained else IGNORE_INDEX) for t in piece]
    assert list(zip(ids, labels)) == expected
    # Token by token: every supervised token belongs to an assistant response, and every token of both
    # responses (with their end tokens) is supervised; the role headers are masked.
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Hello<|im_end|>Paris<|im_end|>"
    for i in range(len(ids) - len(header) + 1):
        if ids[i : i + len(header)] == header:
            assert labels[i : i + len(header)] == [IGNORE_INDEX] * len(header)
    # Generation still targets the last turn, from the same prompt ids as training's last context.
    prompt = build_generation_prompts(tok, [CHAT])[0]
    assert prompt.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")
    n_last = len(tok("Paris", add_special_tokens=False)["input_ids"]) + 1
    assert tok.decode(ids[:-n_last]) == prompt
    with pytest.raises(DataError, match="no assistant"):
        encode_example(tok, {"task": "c", "messages": [{"role": "user", "content": "q"}]}, 64)


def test_chat_truncation_keeps_the_last_turn(tok):
    enc = encode_example(tok, CHAT, max_length=12)
    assert len(enc["input_ids"]) == 12 == len(enc["labels"])
    full = encode_example(tok, CHAT, max_length=256)
    assert enc["input_ids"] == full["input_ids"][-12:] and enc["labels"] == full["labels"][-12:]


def test_template_that_rewrites_earlier_turns_trains_last_turn_only(tok):
    import copy

    tok = copy.deepcopy(tok)
    # A template that renders earlier assistant turns differently once the chat goes on (as templates that
    # drop earlier reasoning do): a prefix of the chat is no prefix of the chat, so only the last turn trains.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_example(tok, CHAT, max_length=256)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "Paris<|im_end|>"


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
