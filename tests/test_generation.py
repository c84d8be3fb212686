"""moelora.generate_answers: the greedy generation path that evaluation scores and the model cards' snippets call.

Tiny random models: the answers are gibberish, but they must be exactly what the chat template + greedy
generate() + a cut at <|im_end|> give by hand, in input order, whatever the batching."""

import pytest
import torch

import moelora
from moelora.base_models import resolve_base_model
from moelora.evaluation import evaluate_exact_match
from moelora.multimodal import EncoderConfig
from tests.multimodal_batches import mixed_examples

PROMPTS = ["What is 2 + 3?", "Reverse the word 'cat'.", "Sort ascending: 9, 1, 5, 7, 3, 2, 8"]


def _lora(encoders=None):
    base, tok = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    model = moelora.get_moelora_model(base, {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                      "tiny-random-llama", encoders=encoders)
    with torch.no_grad():  # B starts at zero: give the adapter an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval(), tok


def _by_hand(model, tok, text, max_new_tokens):
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return tok.decode(new[: new.index(end)] if end in new else new, skip_special_tokens=True).strip()


def test_answers_are_the_chat_template_greedy_generate_and_the_cut_at_end_of_turn():
    model, tok = _lora()
    batched = moelora.generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert batched == [_by_hand(model, tok, p, 6) for p in PROMPTS]  # left padding changes no answer
    assert len(set(batched)) > 1  # not one constant string


def test_every_prompt_form_gives_the_same_answer_as_the_string():
    model, tok = _lora()
    text = PROMPTS[0]
    forms = [text, {"instruction": text}, {"instruction": text, "response": "5"},
             {"messages": [{"role": "user", "content": text}]},
             {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "5"}]}]
    answers = moelora.generate_answers(model, tok, forms, max_new_tokens=6)
    assert answers == [answers[0]] * len(forms)
    # a chat answers after its LAST message, not after an earlier assistant turn
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": text}]}
    ref = tok.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False)
    inputs = tok(ref, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = moelora.generation.decode_answer(tok, out[0, inputs["input_ids"].shape[1]:].tolist(),
                                                moelora.generation.stop_ids(tok))
    assert moelora.generate_answers(model, tok, [chat], max_new_tokens=6) == [expected]


def test_evaluation_scores_what_generate_answers_returns():
    model, tok = _lora(encoders=EncoderConfig())
    examples = mixed_examples()
    answers = moelora.generate_answers(model, tok, examples, max_new_tokens=4, batch_size=4)
    alone = [moelora.generate_answers(model, tok, [ex], max_new_tokens=4)[0] for ex in examples]
    assert answers == alone  # media follow their prompt through the length sort and left padding
    scored = evaluate_exact_match(model, tok, examples, batch_size=2, max_new_tokens=4, progress=False)
    assert [p["prediction"] for p in scored["predictions"]] == answers
    other = [dict(ex, images=[torch.zeros_like(x) for x in ex["images"]]) if ex.get("images") else ex
             for ex in examples]
    assert moelora.generate_answers(model, tok, other, max_new_tokens=4)[1] != answers[1]  # the picture is read


def test_bad_prompts_are_refused_in_one_line():
    model, tok = _lora()
    with pytest.raises(moelora.DataError, match="list of prompts"):
        moelora.generate_answers(model, tok, "What is 2 + 3?")
    with pytest.raises(moelora.DataError, match="string or a dict"):
        moelora.generate_answers(model, tok, [3])
    with pytest.raises(moelora.DataError, match="no prompts"):
        moelora.generate_answers(model, tok, [])
    with pytest.raises(moelora.DataError, match="no encoders"):
        moelora.generate_answers(model, tok, [{"instruction": "<image>\nWhat?", "images": [torch.zeros(3, 16, 16)]}])
