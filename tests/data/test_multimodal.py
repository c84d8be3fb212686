"""The multimodal suite: correct answers, deterministic disjoint splits, the speech cache, log-mel features,
placeholder encoding and the mixed-batch collator."""

import re

import pytest
import torch

from moelora.base_models import build_tiny_tokenizer
from moelora.data import audio, images
from moelora.data.formatting import IGNORE_INDEX, encode_examples
from moelora.data.media import AUDIO, IMAGE, TEXT, MultimodalCollator, encode_multimodal_examples, encode_prompts
from moelora.data.multimodal import (CAPTION_TASKS, DIGIT_WORDS, MULTIMODAL_TASKS, PITCHES, SPOKEN_WORDS,
                                      build_multimodal_suite)
from moelora.errors import DataError

TOKENS = {"image": 4, "audio": 8}
WORD_VALUE = {w: i for i, w in enumerate(DIGIT_WORDS)}


@pytest.fixture(scope="module")
def suite():
    """A small suite of every task (≈50 clips, synthesised once into the shared cache)."""
    return build_multimodal_suite("all", n_train_per_task=4, n_eval_per_task=2, seed=3)


def _answer_from_sources(ex):
    src, task = ex["sources"], ex["task"]
    if task == "digit_read":
        return str(images.digit_label(src[0][1]))
    if task == "digit_compare":
        return str(max(images.digit_label(src[0][1]), images.digit_label(src[1][1])))
    if task == "shape_count":
        return str(len(src[0][1].shapes))
    if task == "shape_color":
        scene = src[0][1]
        return scene.colors[scene.shapes.index(re.search(r"colour is the (\w+)\?", ex["instruction"]).group(1))]
    if task == "spoken_digit":
        return str(WORD_VALUE[src[0][1]])
    if task == "transcribe_word":
        return src[0][1]
    if task == "spoken_arithmetic":
        a, op, b = src[0][1].split()
        return str(WORD_VALUE[a] + WORD_VALUE[b] if op == "plus" else WORD_VALUE[a] - WORD_VALUE[b])
    if task == "digit_audio_match":
        return "yes" if images.digit_label(src[0][1]) == WORD_VALUE[src[1][1]] else "no"
    raise AssertionError(task)


def test_every_task_answers_what_its_media_show(suite):
    train, evals = suite
    assert {ex["task"] for ex in evals} == set(MULTIMODAL_TASKS) | {"add", "reverse_word"}
    for ex in train + evals:
        if ex["task"] in MULTIMODAL_TASKS:
            assert ex["response"] == _answer_from_sources(ex), ex["instruction"]
            assert len(ex.get("images", [])) == ex["instruction"].count("<image>")
            assert len(ex.get("audio", [])) == ex["instruction"].count("<audio>")
            assert all(x.shape == (3, 16, 16) for x in ex.get("images", []))
            assert all(x.shape == (audio.N_MELS, audio.AUDIO_FRAMES) for x in ex.get("audio", []))


def test_splits_are_deterministic_and_disjoint(suite):
    train, evals = suite
    again_train, again_evals = build_multimodal_suite("all", n_train_per_task=4, n_eval_per_task=2, seed=3)
    for a, b in zip(train + evals, again_train + again_evals):
        assert (a["instruction"], a["response"], a.get("sources")) == (b["instruction"], b["response"], b.get("sources"))
        assert all(torch.equal(x, y) for x, y in zip(a.get("images", []) + a.get("audio", []),
                                                     b.get("images", []) + b.get("audio", [])))
    held_out_scans = {i for d in images.digit_pools()["eval"].values() for i in d}
    for ex in train:
        for src in ex.get("sources", []):
            assert not (src[0] == "digit" and src[1] in held_out_scans)
            assert not (src[0] == "speech" and src[4] in PITCHES["eval"])
    for ex in evals:
        for src in ex.get("sources", []):
            assert src[0] != "digit" or src[1] in held_out_scans
            assert src[0] != "speech" or src[4] in PITCHES["eval"]
    keys = lambda exs: {(ex["instruction"], str(ex.get("sources"))) for ex in exs}  # noqa: E731
    assert not keys(train) & keys(evals)
    other_seed, _ = build_multimodal_suite(["digit_read"], 4, 2, seed=4)
    assert [ex["sources"] for ex in other_seed] != [ex["sources"] for ex in train if ex["task"] == "digit_read"]


def test_unknown_task_is_named():
    with pytest.raises(DataError, match="digit_reed.*did you mean 'digit_read'"):
        build_multimodal_suite(["digit_reed"], 1, 1)


def test_speech_is_cached_atomically_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path))
    utterances = [("seven", "en", 155, 42), ("two plus three", "en+f3", 170, 54)]
    first = audio.speech_features(utterances)
    files = sorted((tmp_path / "speech").iterdir())
    assert [f.suffix for f in files] == [".wav", ".wav"]  # no temporary files left behind

    def no_espeak(*args, **kwargs):
        raise AssertionError("espeak-ng ran although the clips are cached")

    monkeypatch.setattr(audio.subprocess, "run", no_espeak)
    second = audio.speech_features(utterances)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.allclose(first[0], first[1])


def test_missing_espeak_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    audio.espeak_version.cache_clear()
    try:
        with pytest.raises(DataError, match="apt-get install espeak-ng"):
            audio.speech_features([("one", "en", 150, 42)])
    finally:
        audio.espeak_version.cache_clear()


def test_log_mel_trims_silence_and_has_fixed_shape():
    t = torch.arange(43 * audio.HOP) / audio.SAMPLE_RATE  # 0.5 s, whole hops so trimming is exact
    tone = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    padded = torch.cat([torch.zeros(16 * audio.HOP), tone, torch.zeros(36 * audio.HOP)])
    a, b = audio.log_mel(tone), audio.log_mel(padded)
    assert a.shape == (audio.N_MELS, audio.AUDIO_FRAMES)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # leading/trailing silence is cut before framing
    fb = audio.mel_filterbank()
    assert fb.shape == (audio.N_MELS, audio.N_FFT // 2 + 1) and bool((fb.sum(1) > 0).all())
    loudest_band = int(a[:, 5:20].mean(1).argmax())
    centre_hz = 700 * (10 ** (torch.linspace(0, 2595 * torch.log10(torch.tensor(1 + 11025 / 700)), 42)[1:-1] / 2595) - 1)
    assert abs(float(centre_hz[loudest_band]) - 440) < 150


def test_shape_scenes_are_validated():
    with pytest.raises(DataError, match="distinct grid cells"):
        images.ShapeScene(("square", "cross"), ("red", "blue"), (3, 3))
    with pytest.raises(DataError, match="unknown colour"):
        images.render_scene(images.ShapeScene(("square",), ("mauve",), (0,)))


def _examples():
    img, clip = torch.rand(3, 16, 16), torch.randn(40, 160)
    return [{"task": "t", "instruction": "What is 2 + 3?", "response": "5"},
            {"task": "i", "instruction": "<image> and <audio>: same?", "response": "no", "images": [img], "audio": [clip]}]


def test_placeholders_expand_and_text_encodes_as_before():
    tok = build_tiny_tokenizer()
    text, mixed = encode_multimodal_examples(tok, _examples(), 256, TOKENS)
    plain = encode_examples(tok, _examples()[:1], 256)[0]
    assert text["input_ids"] == plain["input_ids"] and text["labels"] == plain["labels"]
    assert text["media_mask"] == [TEXT] * len(text["input_ids"])
    kinds = mixed["media_mask"]
    assert kinds.count(IMAGE) == 4 and kinds.count(AUDIO) == 8
    first_img = kinds.index(IMAGE)
    assert kinds[first_img:first_img + 4] == [IMAGE] * 4 and kinds.index(AUDIO) > first_img + 4
    assert all(mixed["input_ids"][i] == tok.pad_token_id for i, k in enumerate(kinds) if k)
    assert all(lab == IGNORE_INDEX for lab, k in zip(mixed["labels"], kinds) if k)
    ids, media = encode_prompts(tok, _examples()[:1], None)
    assert media is None and ids == tok([tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False)],
        add_special_tokens=False)["input_ids"]


def test_collator_and_generation_batches_keep_positions():
    tok = build_tiny_tokenizer()
    exs = _examples()
    encoded = encode_multimodal_examples(tok, exs, 256, TOKENS)
    batch = MultimodalCollator(tok.pad_token_id)(encoded)
    assert batch["media_mask"].shape == batch["input_ids"].shape
    assert batch["media_mask"][1].tolist()[:len(encoded[1]["media_mask"])] == encoded[1]["media_mask"]
    assert int(batch["media_mask"][0].sum()) == 0
    assert torch.equal(batch["images"][0], exs[1]["images"][0]) and batch["audio"].shape == (1, 40, 160)
    ids, media = encode_prompts(tok, exs, TOKENS)
    width = max(map(len, ids)) + 3
    left = media.batch([1, 0], width)  # left padding: placeholders move right with the prompt
    assert left["media_mask"][0, width - len(ids[1]):].tolist() == [k for k in encoded[1]["media_mask"][:len(ids[1])]]
    assert int(left["media_mask"][1].sum()) == 0


@pytest.mark.parametrize("example,match", [
    ({"task": "x", "instruction": "<image> <image>", "response": "1", "images": [torch.rand(3, 16, 16)]},
     "2 <image> markers but 1 images"),
    ({"task": "x", "instruction": "<audio>", "response": "1"}, "1 <audio> markers but 0 audio"),
])
def test_marker_mismatch_is_named(example, match):
    with pytest.raises(DataError, match=match):
        encode_multimodal_examples(build_tiny_tokenizer(), [example], 256, TOKENS)


def test_truncation_never_cuts_a_placeholder_and_text_models_refuse_media():
    tok = build_tiny_tokenizer()
    with pytest.raises(DataError, match="without cutting its images/audio"):
        encode_multimodal_examples(tok, _examples()[1:], 20, TOKENS)
    with pytest.raises(DataError, match="no encoders"):
        encode_multimodal_examples(tok, _examples()[1:], 256, None)


# ---------------------------------------------------------------- captions: the align stage's data
def _caption_from_sources(ex):
    kind, *rest = ex["sources"][0]
    if kind == "digit":
        return str(images.digit_label(rest[0]))
    if kind == "scene":
        scene = rest[0]
        by_cell = sorted(zip(scene.cells, scene.colors, scene.shapes))  # reading order = grid cell order
        return ", ".join(f"{color} {shape}" for _, color, shape in by_cell)
    return rest[0]  # speech: the text that was said


@pytest.fixture(scope="module")
def captions():
    return build_multimodal_suite(list(CAPTION_TASKS), n_train_per_task=24, n_eval_per_task=4, seed=3)


def test_captions_name_everything_in_their_medium(captions):
    train, evals = captions
    assert {ex["task"] for ex in evals} == set(CAPTION_TASKS)
    for ex in train + evals:
        assert ex["template"] == "plain" and len(ex["sources"]) == 1
        assert ex["instruction"] == ("<audio>" if ex["task"] == "caption_speech" else "<image>")
        assert ex["response"] == _caption_from_sources(ex)
    spoken = {ex["response"] for ex in train if ex["task"] == "caption_speech"}
    assert spoken & set(DIGIT_WORDS) and spoken & set(SPOKEN_WORDS) and any(" plus " in s or " minus " in s for s in spoken)
    scenes = [ex["sources"][0][1] for ex in train if ex["task"] == "caption_shapes"]
    assert any(len(s.shapes) == 4 for s in scenes) and any(len(set(s.shapes)) < len(s.shapes) for s in scenes)


def test_captions_keep_the_held_out_split(captions):
    train, evals = captions
    held_out_scans = {i for d in images.digit_pools()["eval"].values() for i in d}
    for ex in train:
        src = ex["sources"][0]
        assert not (src[0] == "digit" and src[1] in held_out_scans)
        assert not (src[0] == "speech" and src[4] in PITCHES["eval"])
    assert not {str(ex["sources"]) for ex in train} & {str(ex["sources"]) for ex in evals}


def test_captions_are_not_part_of_all_and_evaluate_can_score_them():
    from moelora.eval_suite import load_eval_examples, needs_media, suite_task_names

    assert not set(CAPTION_TASKS) & set(suite_task_names("multimodal"))
    assert all(needs_media(t) for t in CAPTION_TASKS)
    by_task = load_eval_examples(["caption_shapes", "add"], 2, seed=0)
    assert list(by_task) == ["caption_shapes", "add"] and by_task["caption_shapes"][0]["template"] == "plain"


def test_plain_examples_are_the_medium_then_the_caption(captions):
    tok = build_tiny_tokenizer()
    ex = next(e for e in captions[0] if e["task"] == "caption_shapes")
    row = encode_multimodal_examples(tok, [ex], 64, TOKENS)[0]
    caption = tok(ex["response"], add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [tok.pad_token_id] * TOKENS["image"] + caption + [row["input_ids"][-1]]
    assert row["media_mask"][:TOKENS["image"]] == [IMAGE] * TOKENS["image"]
    assert row["labels"] == [IGNORE_INDEX] * TOKENS["image"] + caption + [row["input_ids"][-1]]
    ids, media = encode_prompts(tok, [ex], TOKENS)
    assert ids == [[tok.pad_token_id] * TOKENS["image"]]  # generation starts right after the medium


@pytest.mark.parametrize("example,match", [
    ({"task": "t", "instruction": "x", "response": "y", "template": "llava"}, "template 'llava'.*only one known is 'plain'"),
    ({"task": "t", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "template": "plain"}, "'plain' example of task 't' needs 'instruction' and 'response'"),
])
def test_bad_templates_are_named(example, match):
    with pytest.raises(DataError, match=match):
        encode_examples(build_tiny_tokenizer(), [example], 64)
