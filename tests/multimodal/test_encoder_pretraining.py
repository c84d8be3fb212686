"""Encoder pretraining on the suite's labels (issue 18): the labels say what each picture and clip shows, the
encoders learn them (held-out), only the feature extractors change, and train.py runs it before the LM stage."""

import json
import random
import shutil

import pytest
import torch

from moelora.data import images
from moelora.data.multimodal import (IGNORE, LABEL_SLOTS, SPEECH_WORDS, build_multimodal_suite, scene_caption,
                                     source_labels)
from moelora.errors import ConfigError
from moelora.multimodal.encoders import EncoderConfig
from moelora.multimodal.model import MediaEncoders
from moelora.multimodal.pretraining import labelled_media, pretrain_encoders

from tests.multimodal.test_staged_training import TINY, _changed_parts
from tests.tiny_runs import train


def test_labels_say_what_each_source_shows():
    digit = images.digit_pools()["train"][7][0]
    assert source_labels(("digit", digit)) == ("image", [7] + [IGNORE] * 18)
    scene = images.ShapeScene(("cross", "square"), ("blue", "white"), (4, 0))
    kind, labels = source_labels(("scene", scene))
    kinds, colours = labels[1:10], labels[10:]
    assert kind == "image" and labels[0] == IGNORE
    assert kinds == [1 + images.SHAPES.index("square"), 0, 0, 0, 1 + images.SHAPES.index("cross"), 0, 0, 0, 0]
    assert colours[0] == 1 + list(images.COLORS).index("white") and colours[4] == 1 + list(images.COLORS).index("blue")
    assert sum(colours) == colours[0] + colours[4]
    assert scene_caption(scene) == "white square, blue cross"  # the caption says what the labels say
    kind, labels = source_labels(("speech", "seven plus two", "en", 140, 30))
    assert kind == "audio" and [SPEECH_WORDS[i - 1] for i in labels] == ["seven", "plus", "two"]
    assert source_labels(("speech", "zebra", "en", 140, 30))[1] == [1 + SPEECH_WORDS.index("zebra"), 0, 0]
    for kind_, slots in LABEL_SLOTS.items():  # every label fits its slot's classes
        assert all(isinstance(n, int) and n > 1 for n in slots), kind_


def test_every_spoken_text_of_the_suite_has_labels():
    train_set, _ = build_multimodal_suite(["caption_speech"], n_train_per_task=60, n_eval_per_task=0, seed=3)
    for ex in train_set:
        kind, labels = source_labels(ex["sources"][0])
        assert " ".join(SPEECH_WORDS[i - 1] for i in labels if i) == ex["response"]


def test_labelled_media_pairs_each_tensor_with_its_own_source_once():
    train_set, _ = build_multimodal_suite(["digit_audio_match"], n_train_per_task=12, n_eval_per_task=0, seed=0)
    media = labelled_media(train_set + train_set)  # every item twice: kept once
    scans = {s for ex in train_set for s in ex["sources"] if s[0] == "digit"}
    clips = {s for ex in train_set for s in ex["sources"] if s[0] == "speech"}
    assert len(media["image"][0]) == len(scans) and len(media["audio"][0]) == len(clips)
    for ex in train_set:  # the picture under each digit label is that digit's scan
        scan = ex["sources"][0]
        row = [i for i in range(len(media["image"][0])) if torch.equal(media["image"][0][i], ex["images"][0])]
        assert row and all(media["image"][1][i, 0].item() == images.digit_label(scan[1]) for i in row)


@pytest.fixture(scope="module")
def shapes():
    return build_multimodal_suite(["caption_shapes", "caption_digit"], n_train_per_task=600, n_eval_per_task=64,
                                  seed=0)


def _encoders(seed=0):
    torch.manual_seed(seed)
    return MediaEncoders(EncoderConfig(image_grid=4, audio_width=8), hidden=32, embed_std=0.1)


def test_pretraining_teaches_kinds_colours_and_digits_to_held_out_pictures(shapes):
    """Shape kinds are what the caption align learned least reliably (RESULTS.md §16); taught from labels, the
    encoder reads them in held-out scenes (chance: 1/3 of occupied cells)."""
    train_set, eval_set = shapes
    encoders = _encoders()
    before = pretrain_encoders(_encoders(), train_set, eval_set, steps=0, seed=0)["image"]["held-out accuracy"]
    report = pretrain_encoders(encoders, train_set, eval_set, steps=450, seed=0)["image"]
    assert report["items"] == len(labelled_media(train_set)["image"][0])
    acc = report["held-out accuracy"]
    assert acc["kinds"] >= 80 and acc["colours"] >= 95 and acc["digit"] >= 70, acc
    assert before["kinds"] < 60 and before["digit"] < 40, before


def test_pretraining_trains_only_the_feature_extractors_and_leaves_the_run_rng_alone(shapes):
    train_set, eval_set = shapes
    encoders = _encoders()
    encoders.image.conv.requires_grad_(False)  # a frozen part stays frozen afterwards (its values still train)
    before = {k: v.clone() for k, v in encoders.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain_encoders(encoders, train_set, eval_set, steps=3, seed=0)
    assert torch.equal(torch.rand(3), expected)  # forked RNG: the run draws what it would have drawn
    changed = {k for k, v in encoders.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("image.") for k in changed)  # no clips in this data: audio untouched
    assert not any(k.split(".")[1].startswith("proj") for k in changed)  # projectors are the align stage's
    assert any(k.startswith("image.conv.") for k in changed)
    assert not any(p.requires_grad for p in encoders.image.conv.parameters())
    assert all(p.grad is None for p in encoders.parameters())


def test_pretraining_is_deterministic(shapes):
    train_set, eval_set = shapes
    a, b = _encoders(), _encoders()
    pretrain_encoders(a, train_set, eval_set, steps=4, seed=5)
    pretrain_encoders(b, train_set, eval_set, steps=4, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_pretraining_rate_warms_up_then_decays_to_nothing_by_the_last_step():
    from moelora.multimodal.pretraining import WARMUP, _rate

    steps = 1000
    rates = [_rate(s, steps) for s in range(steps)]
    warm = round(WARMUP * steps)
    assert rates[0] == pytest.approx(1 / warm) and rates[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(rates[:warm - 1], rates[1:warm]))  # rising
    assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1:]))  # then falling
    assert rates[-1] < 1e-4 and rates[(steps + warm) // 2] == pytest.approx(0.5, abs=0.01)
    assert _rate(0, 1) == 1.0  # a one-step run takes one full step

def test_text_only_examples_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="encoder_pretraining_steps"):
        pretrain_encoders(_encoders(), [{"task": "add", "instruction": "1+1", "response": "2"}], [], 3, 0)


def test_train_py_pretrains_then_aligns_with_the_encoders_frozen(tmp_path):
    """LLaVA's stage 1 with a pretrained encoder: the projector aligns, the encoder stays as pretrained."""
    out = tmp_path / "run"
    train.main([*TINY, "stage=align", "freeze_encoders=true", "encoder_pretraining_steps=5", f"output_dir={out}"])
    parts = _changed_parts(out)
    assert parts["encoders"] == {True}  # pretrained: every feature-extractor tensor moved
    assert parts["projectors"] == {True} and parts["adapters"] == {False}
    report = json.loads((out / "encoder_pretraining.json").read_text())
    assert set(report) == {"image", "audio"} and report["image"]["items"] > 0
    # without pretraining the frozen encoders stay at their initial values
    plain = tmp_path / "plain"
    train.main([*TINY, "stage=align", "freeze_encoders=true", f"output_dir={plain}"])
    assert _changed_parts(plain)["encoders"] == {False} and not (plain / "encoder_pretraining.json").exists()


def test_negative_pretraining_steps_are_named(tmp_path, capsys):
    assert train.cli([*TINY, "encoder_pretraining_steps=-1", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "encoder_pretraining_steps" in err and "must be >= 0" in err and "Traceback" not in err


def test_pretraining_on_a_text_run_is_refused(tmp_path, capsys):
    from tests.tiny_runs import TEXT, TINY_RUN

    assert train.cli([*TINY_RUN, *TEXT, "encoder_pretraining_steps=10", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "encoder_pretraining_steps" in capsys.readouterr().err


# ---------------------------------------------------------------- a projector that writes soft words
def test_caption_targets_right_align_each_caption_after_spaces():
    from moelora.base_models import build_tiny_tokenizer
    from moelora.multimodal.pretraining import caption_targets

    tok = build_tiny_tokenizer()
    space, = tok(" ", add_special_tokens=False).input_ids
    rows = caption_targets(["7", "seven"], tok, 6)
    assert rows.tolist() == [[space] * 5 + tok("7").input_ids, [space] + tok("seven").input_ids]
    with pytest.raises(ConfigError, match="encoders.projector.*'seven plus two' is 14 tokens.*6"):
        caption_targets(["seven plus two"], tok, 6)


def test_words_pretraining_writes_each_held_out_items_caption_and_trains_the_projector():
    """Digit scans and spoken digits: after pretraining the projector's most likely word at each token is the
    item's caption ("7" / "seven", after spaces) for held-out items, and its output is that word's embedding."""
    from moelora.base_models import build_tiny_tokenizer
    from moelora.multimodal.pretraining import caption_targets

    tok = build_tiny_tokenizer()
    train_set, eval_set = build_multimodal_suite(["digit_read", "spoken_digit"], n_train_per_task=400,
                                                 n_eval_per_task=48, seed=0)
    torch.manual_seed(0)
    encoders = MediaEncoders(EncoderConfig(projector="words", image_width=16, audio_width=16), hidden=32,
                             embed_std=0.1)
    table = torch.nn.Embedding(len(tok), 32)
    torch.nn.init.normal_(table.weight, std=0.1)
    for proj in (encoders.image.proj, encoders.audio.proj):
        proj.bind(table)
    before = {k: v.clone() for k, v in encoders.state_dict().items()}
    with pytest.raises(ConfigError, match="tokenizer"):
        pretrain_encoders(encoders, train_set, eval_set, steps=1, seed=0)
    report = pretrain_encoders(encoders, train_set, eval_set, steps=500, seed=0, tokenizer=tok)
    assert report["image"]["held-out accuracy"]["captions"] >= 70, report
    assert report["audio"]["held-out accuracy"]["captions"] >= 70, report
    changed = {k.split(".")[1] for k, v in encoders.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"conv", "norm", "pos", "proj"}  # the projector learns its words here, not in an align
    # what the LM receives: per token nearly the embedding of the caption's word there
    media = labelled_media(eval_set)["audio"]
    with torch.no_grad():
        out = encoders.audio(media[0][:8])
    want = table.weight[caption_targets(media[2][:8], tok, 8)]
    assert (out - want).norm(dim=-1).mean() < 0.3 * want.norm(dim=-1).mean()


@pytest.mark.parametrize("writer", ["mlp", "attention", "autoregressive"])
def test_a_words_projector_mixes_its_words_rows_of_the_bound_table_and_needs_both(writer):
    from moelora.multimodal.encoders import WordProjector

    proj = WordProjector(tokens=3, width=4, hidden=8, embed_std=0.1, vocabulary=6, writer=writer)
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="attach the encoders"):
        proj(x)
    table = torch.nn.Embedding(20, 8)
    proj.bind(table)
    with pytest.raises(ConfigError, match="no vocabulary yet.*encoder_pretraining_steps"):
        proj(x)
    proj.set_vocabulary([7, 3, 11, 3])  # distinct and sorted; the rest of the buffer is padding
    assert proj.vocab_ids.tolist() == [3, 7, 11, -1, -1, -1]
    out = proj(x)
    rows = table.weight[[3, 7, 11]]
    weights = torch.linalg.lstsq(rows.T, out.reshape(-1, 8).T).solution.T  # each token: a mixture of the 3 rows
    assert torch.allclose(rows.T @ weights.T, out.reshape(-1, 8).T, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(6), atol=1e-4) and (weights > -1e-4).all()
    assert set(proj.written(x).flatten().tolist()) <= {3, 7, 11}  # never the padding
    assert "vocab_ids" in proj.state_dict() and not any("weight" in k and k.count(".") == 0 for k in proj.state_dict())
    assert all(t.shape[0] != 20 for t in proj.state_dict().values())  # nothing of the LM's 20-row table is saved
    with pytest.raises(ConfigError, match="encoders.word_vocabulary.*7 distinct tokens"):
        proj.set_vocabulary(range(7))
    with pytest.raises(Exception, match="3 tokens"):
        proj.logits(torch.randn(2, 4, 4))


def test_an_autoregressive_writer_reads_only_the_words_after_each_position_and_writes_greedily():
    """Right to left: a position's logits depend on the words said at the positions after it, not before it or
    at it; told its own greedy words it gives its greedy logits (pretraining's teacher forcing is inference's)."""
    from moelora.multimodal.encoders import WordProjector

    torch.manual_seed(0)
    proj = WordProjector(tokens=5, width=8, hidden=16, embed_std=0.1, vocabulary=6, writer="autoregressive")
    proj.bind(torch.nn.Embedding(20, 16))
    proj.set_vocabulary([3, 5, 9, 11])
    x = torch.randn(3, 5, 8)
    greedy = proj.logits(x)[..., :4]  # the 4 real words (the rest is -inf padding)
    said = greedy.argmax(-1)
    assert torch.allclose(proj.logits(x, said)[..., :4], greedy, atol=1e-5)
    assert proj.vocab_ids[said].tolist() == proj.written(x).tolist()
    other = said.clone()
    other[:, 2] = (other[:, 2] + 1) % 4
    moved = (proj.logits(x, other)[..., :4] - greedy).abs().amax(-1)
    assert (moved[:, :2] > 1e-3).all() and (moved[:, 2:] == 0).all()
    proj.requires_grad_(False)  # frozen (the perceive recipe's stage 2) or under no_grad: the greedy pass's own
    with torch.no_grad():       # last step is the answer, bit for bit the pass over its words
        assert torch.equal(proj.logits(x), proj.logits(x, said))
    proj.requires_grad_(True)
    greedy.sum().backward()  # the written words' logits train the writer (stage 2 with freeze_projectors: false)
    assert proj.previous.weight.grad is not None and proj.slots.grad.abs().sum() > 0


def test_the_encoders_config_names_an_unknown_projector():
    with pytest.raises(ConfigError, match="encoders.projector.*mlp, words.*'linear'"):
        EncoderConfig(projector="linear").validate()
    with pytest.raises(ConfigError, match="encoders.word_writer.*mlp or attention or autoregressive.*'gru'"):
        EncoderConfig(projector="words", word_writer="gru").validate()
    with pytest.raises(ConfigError, match="encoders.projector.*our conv encoders only.*image_model"):
        EncoderConfig(projector="words", image_model="some/clip").validate()


@pytest.mark.parametrize("base_name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_train_py_pretrains_soft_words_and_reloads_them_bound_to_the_lm(base_name, tmp_path):
    """A run with soft words trains, saves and reloads with the same outputs: the loaded projector reads the
    loaded LM's embeddings (GPT-2's too: its token table is `wte`, beside learned positions)."""
    import moelora
    from moelora.base_models import resolve_base_model
    from tests.multimodal_batches import mixed_batch

    out = tmp_path / "run"
    gpt2 = ["method={name: lora, r: 2, alpha: 4, target_modules: [c_attn]}"] if base_name.endswith("gpt2") else []
    train.main([*TINY, *gpt2, f"base_model={base_name}", "encoders.projector=words", "encoder_pretraining_steps=5",
                f"output_dir={out}"])
    assert set(json.loads((out / "encoder_pretraining.json").read_text())) == {"image", "audio"}
    base, tok = resolve_base_model(base_name)
    model = moelora.MoELoRAModel.from_pretrained(base, out / "adapter").eval()
    assert model.encoders.image.proj._embedding is model.base_model.get_input_embeddings()
    batch = mixed_batch(model, tok, labels=False)
    with torch.no_grad():
        first = model(**batch).logits
        again = moelora.MoELoRAModel.from_pretrained(resolve_base_model(base_name)[0], out / "adapter").eval()
        assert torch.equal(again(**batch).logits, first)


def test_a_bf16_base_pretrains_and_trains_soft_words_with_finite_weights_and_learning_adapters(tmp_path):
    """The users' precision: a bf16 base, its encoders in bf16 too (the autoregressive writer's greedy loop
    included): pretraining's losses and every saved weight are finite, and the adapters move."""
    out = tmp_path / "run"
    train.main([*TINY, "dtype=bfloat16", "encoders.projector=words", "encoder_pretraining_steps=4",
                "max_steps=2", f"output_dir={out}"])
    report = json.loads((out / "encoder_pretraining.json").read_text())
    assert all(0 < report[kind]["final loss"] < 20 for kind in ("image", "audio")), report  # finite, not NaN
    from moelora.checkpoint import load_tensors

    saved = load_tensors(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    assert any(k.startswith("encoders.image.proj.previous") for k in saved)  # the default writer: autoregressive
    lora_b = [t for k, t in saved.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: the adapters trained


def test_a_words_projector_without_pretraining_is_refused_with_the_key_named(tmp_path, capsys):
    assert train.cli([*TINY, "encoders.projector=words", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "encoder_pretraining_steps" in err and "words" in err and "Traceback" not in err


def test_pretraining_data_adds_media_for_pretraining_only(tmp_path, capsys):
    """encoder_pretraining_data's pictures join the pretraining's items; the LM's training set is unchanged."""
    plain, more = tmp_path / "plain", tmp_path / "more"
    train.main([*TINY, "encoder_pretraining_steps=2", f"output_dir={plain}"])
    train.main([*TINY, "encoder_pretraining_steps=2", "encoder_pretraining_data={caption_digit: 30}",
                f"output_dir={more}"])
    items = [json.loads((run / "encoder_pretraining.json").read_text())["image"]["items"] for run in (plain, more)]
    assert items[0] < items[1] <= items[0] + 30
    epochs = [[json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
              for run in (plain, more)]
    assert epochs[0] and epochs[0] == epochs[1]  # the same steps are the same share of an epoch: same training set
    for bad, named in (("{caption_digit: 0}", "encoder_pretraining_data.caption_digit"),
                       ("{add: 5}", "encoder_pretraining_data.add"), ("[3]", "encoder_pretraining_data")):
        assert train.cli([*TINY, "encoder_pretraining_steps=2", f"encoder_pretraining_data={bad}",
                          f"output_dir={tmp_path / 'bad'}"]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
    assert train.cli([*TINY, "encoder_pretraining_data={caption_digit: 3}", f"output_dir={tmp_path / 'nosteps'}"]) == 2
    assert "encoder_pretraining_steps > 0" in capsys.readouterr().err


def test_every_method_of_one_seed_starts_the_same_encoders(tmp_path):
    """Method comparisons on the perceive recipe differ in the method only: the encoders are drawn on their own
    RNG stream, so a MixLoRA run and a LoRA run of one seed start (and, frozen, keep) identical encoders."""
    from moelora.checkpoint import load_tensors

    frozen = ["freeze_encoders=true", "freeze_projectors=true"]
    runs = {"lora": [], "mixlora": ["method={name: mixlora, num_factors: 4, r: 2, target_modules: [q_proj, v_proj]}"]}
    saved = {}
    for name, method in runs.items():
        train.main([*TINY, *frozen, *method, f"output_dir={tmp_path / name}"])
        tensors = load_tensors(tmp_path / name / "adapter/adapter_model.safetensors")
        saved[name] = {k: v for k, v in tensors.items() if k.startswith("encoders.")}
    assert saved["lora"] and saved["lora"].keys() == saved["mixlora"].keys()
    assert all(torch.equal(saved["lora"][k], saved["mixlora"][k]) for k in saved["lora"])


def test_a_words_folder_saved_before_word_writer_loads_with_the_mlp_writer_it_was_trained_with(tmp_path):
    """The default writer became autoregressive; a folder written before the key existed holds an MLP writer's
    weights and loads as one, weights as saved."""
    from moelora import LoRAConfig, MoELoRAModel, get_moelora_model
    from moelora.base_models import resolve_base_model

    torch.manual_seed(0)
    base, _ = resolve_base_model("tiny-random-llama")
    model = get_moelora_model(base, LoRAConfig(r=4, target_modules=["q_proj"]),
                              encoders=EncoderConfig(projector="words", word_writer="mlp"))
    model.encoders.image.proj.set_vocabulary([5, 6, 7])
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "moelora_config.json").read_text())
    del meta["encoders"]["word_writer"]
    (tmp_path / "moelora_config.json").write_text(json.dumps(meta))
    loaded = MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path)
    assert loaded.encoders.config.word_writer == "mlp" and loaded.encoders.image.proj.writer == "mlp"
    saved, restored = model.encoders.state_dict(), loaded.encoders.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert EncoderConfig().word_writer == "autoregressive"  # what a new run gets


def test_modality_routing_pretrains_soft_words_with_its_vision_speech_projector_bound(tmp_path):
    """Modality routing swaps in Phi-4's audio encoder with a second projector after the encoders are attached;
    its words projectors must read the LM too (configs/perceive/modality.yaml stopped at pretraining before)."""
    out = tmp_path / "run"
    modality = "method={name: modality, vision_r: 2, speech_r: 2, vision_alpha: 4, speech_alpha: 4, target_modules: [q_proj, v_proj]}"
    train.main([*[a for a in TINY if not a.startswith("method=")], modality, "encoders.projector=words",
                "encoder_pretraining_steps=2", f"output_dir={out}"])
    import moelora
    from moelora.base_models import resolve_base_model

    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.MoELoRAModel.from_pretrained(base, out / "adapter")
    emb = model.base_model.get_input_embeddings()
    assert model.encoders.audio.proj_vision_speech._embedding is emb and model.encoders.audio.proj._embedding is emb


def test_a_soft_words_run_resumes_exactly_without_pretraining_again(tmp_path):
    """A crashed run with the autoregressive writer, resumed from its step-2 checkpoint, ends where the
    uninterrupted run ends: the checkpoint holds the pretrained encoders and their vocabulary, so the resumed run
    does not pretrain them again (it would overwrite them with a fresh draw)."""
    from moelora.checkpoint import load_tensors

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY, "encoders.projector=words", "encoder_pretraining_steps=3", "save_steps=2"]
    train.main([*common, f"output_dir={straight}"])
    train.main([*common, f"output_dir={resumed}"])
    shutil.rmtree(resumed / "adapter")  # as if it crashed after step 2's checkpoint
    (resumed / "encoder_pretraining.json").unlink()
    train.main([*common, f"output_dir={resumed}", "resume_from_checkpoint=true"])
    assert not (resumed / "encoder_pretraining.json").exists()  # resumed: no second pretraining
    want = load_tensors(straight / "adapter" / "adapter_model.safetensors")
    got = load_tensors(resumed / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and any(k.startswith("encoders.image.proj.previous") for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    meta = [json.loads((run / "adapter" / "moelora_config.json").read_text()) for run in (straight, resumed)]
    assert meta[0]["encoders"] == meta[1]["encoders"]
