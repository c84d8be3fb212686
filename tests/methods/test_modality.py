"""Phi-4-style modality routing: per-sample modes in one batch, text untouched, per-modality PEFT folders."""

import pytest
import torch

import moelora
from moelora.checkpoint import read_json, write_json
from moelora.base_models import resolve_base_model
from moelora.methods.modality import ModalityLoRAModel
from tests.conftest import randomize_adapters
from tests.multimodal_batches import base_inputs, mixed_batch, mixed_examples


def _model(seed=0, **fields):
    base, tok = resolve_base_model("tiny-random-llama")
    torch.manual_seed(0)
    cfg = moelora.ModalityLoRAConfig(**{"vision_r": 4, "vision_alpha": 8.0, "speech_r": 4, "speech_alpha": 4.0, **fields})
    model = moelora.get_moelora_model(base, cfg, base_model_id="tiny-random-llama")
    randomize_adapters(model, seed=seed, scale=0.2)
    return model.eval(), tok


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_modes_follow_phi4_and_mix_in_one_batch():
    model, tok = _model()
    batch = mixed_batch(model, tok)  # text, image, audio, image+audio
    assert ModalityLoRAModel.modes(batch["media_mask"]).tolist() == [-1, 0, 1, 0]  # image+audio -> vision


def test_mixed_batch_equals_each_sample_alone():
    model, tok = _model()
    examples = mixed_examples()
    batch = mixed_batch(model, tok, examples)
    together = _logits(model, batch)
    for i, ex in enumerate(examples):
        alone = _logits(model, mixed_batch(model, tok, [ex]))
        n = alone.shape[1]
        assert bool(batch["attention_mask"][i, :n].all()) and int(batch["attention_mask"][i].sum()) == n
        torch.testing.assert_close(together[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_text_samples_are_bit_identical_to_the_base_model():
    model, tok = _model()
    base, _ = resolve_base_model("tiny-random-llama")
    batch = mixed_batch(model, tok)
    text_only = mixed_batch(model, tok, mixed_examples()[:1] * 2)
    ids_only = {k: text_only[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(_logits(model, text_only), _logits(base, ids_only))  # an all-text batch: no adapter at all
    mixed = _logits(model, batch)
    assert torch.equal(mixed[0], _logits(base, {k: batch[k] for k in ("input_ids", "attention_mask")})[0])
    assert not torch.allclose(mixed[1:], _logits(base, base_inputs(model, batch))[1:])  # the others are adapted


def test_each_modality_uses_only_its_own_lora():
    model, tok = _model()
    batch = mixed_batch(model, tok)
    before = _logits(model, batch)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B[:, layer.block:] = 0  # drop the speech LoRA
    after = _logits(model, batch)
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])  # text, image, image+audio: unaffected
    assert not torch.allclose(after[2], before[2])  # the audio-only sample used it


def test_encoders_are_trainable_and_a_training_step_never_moves_the_lm():
    model, tok = _model()
    batch = mixed_batch(model, tok, labels=True)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("encoders.") for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    model(**batch).loss.backward()
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_unequal_ranks_pad_with_zeros_that_stay_zero_and_round_trip(tmp_path):
    model, tok = _model(vision_r=4, speech_r=2)
    with torch.no_grad():
        for layer in model.adapter_layers().values():  # restore the structural zeros randomize_adapters filled
            layer.lora_A[layer.block + 2:] = 0
            layer.lora_B[:, layer.block + 2:] = 0
    model.train()
    model(**mixed_batch(model, tok, labels=True)).loss.backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=0.1).step()
    layer = next(iter(model.adapter_layers().values()))
    assert layer.block == 4 and float(layer.lora_A[6:].detach().abs().sum()) == 0 and float(layer.lora_B[:, 6:].detach().abs().sum()) == 0
    model.eval()
    batch = mixed_batch(model, tok)
    model.save_pretrained(tmp_path / "adapter")
    speech = read_json(tmp_path / "adapter/speech-lora/adapter_config.json")
    assert (speech["r"], speech["lora_alpha"]) == (2, 4.0)
    loaded = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    assert isinstance(loaded, ModalityLoRAModel) and loaded.encoder_config == model.encoder_config
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


@pytest.mark.parametrize("modality,row", [("vision", 1), ("speech", 2)])
def test_each_modality_folder_loads_in_peft_and_gives_our_logits(modality, row, tmp_path):
    from peft import PeftModel

    model, tok = _model()
    model.save_pretrained(tmp_path / "adapter")
    batch = mixed_batch(model, tok, [mixed_examples()[row]])
    peft_model = PeftModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], str(tmp_path / f"adapter/{modality}-lora"))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(**base_inputs(model, batch)).logits
    torch.testing.assert_close(theirs, _logits(model, batch), rtol=1e-5, atol=1e-5)


def test_mismatched_folder_is_refused(tmp_path):
    model, _ = _model()
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter/vision-lora/adapter_config.json"
    cfg = read_json(path)
    write_json(path, {**cfg, "r": 8})
    with pytest.raises(moelora.CheckpointError, match="vision-lora/adapter_config.json"):
        moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")


@pytest.mark.parametrize("option,value", [("alpha_pattern", {"q_proj": 64}), ("rank_pattern", {"v_proj": 8}),
                                          ("use_dora", True), ("use_rslora", True)])
def test_a_modality_folder_with_options_plain_lora_cannot_reproduce_is_refused(option, value, tmp_path):
    """A PEFT option that changes the scale or shape (alpha_pattern: another alpha for q_proj) must not load
    silently with the folder's plain alpha: both the moelora folder and from_peft_folders refuse it by name."""
    model, _ = _model()
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter/speech-lora/adapter_config.json"
    write_json(path, {**read_json(path), option: value})
    with pytest.raises(moelora.CheckpointError, match=f"speech-lora/adapter_config.json: '{option}'"):
        moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    folders = {m: tmp_path / f"adapter/{m}-lora" for m in ("vision", "speech")}
    with pytest.raises(moelora.CheckpointError, match=option):
        ModalityLoRAModel.from_peft_folders(resolve_base_model("tiny-random-llama")[0], folders)


def test_generation_of_a_mixed_batch_equals_each_sample_alone():
    from moelora.evaluation import evaluate_exact_match

    model, tok = _model()
    examples = mixed_examples()
    together = evaluate_exact_match(model, tok, examples, batch_size=4, max_new_tokens=5, progress=False)
    alone = [evaluate_exact_match(model, tok, [ex], batch_size=1, max_new_tokens=5, progress=False)
             for ex in examples]
    assert [p["prediction"] for p in together["predictions"]] == [a["predictions"][0]["prediction"] for a in alone]
    with model.disable_adapter():  # the base model: reads the placeholders as text, no encoders
        base = evaluate_exact_match(model, tok, examples, batch_size=4, max_new_tokens=5, progress=False)
    assert base["predictions"][0] == together["predictions"][0]  # the text sample never used an adapter
    assert [p["prediction"] for p in base["predictions"]] != [p["prediction"] for p in together["predictions"]]


def test_from_peft_folders_takes_each_folders_rank_and_alpha(tmp_path):
    model, tok = _model(vision_r=4, speech_r=2, speech_alpha=6.0)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_A[layer.block + 2:] = 0
            layer.lora_B[:, layer.block + 2:] = 0
    model.save_pretrained(tmp_path / "adapter")
    folders = {m: tmp_path / f"adapter/{m}-lora" for m in ("vision", "speech")}
    loaded = ModalityLoRAModel.from_peft_folders(resolve_base_model("tiny-random-llama")[0], folders)
    cfg = loaded.method_config
    assert (cfg.vision_r, cfg.vision_alpha, cfg.speech_r, cfg.speech_alpha) == (4, 8.0, 2, 6.0)
    loaded.encoders.load_state_dict(model.encoders.state_dict())  # the folders carry LoRAs only
    batch = mixed_batch(model, tok)
    torch.testing.assert_close(_logits(loaded.eval(), batch), _logits(model, batch), rtol=0, atol=0)
    with pytest.raises(moelora.CheckpointError, match="one folder per modality"):
        ModalityLoRAModel.from_peft_folders(resolve_base_model("tiny-random-llama")[0], {"vision": folders["vision"]})


def test_an_all_text_training_batch_backpropagates_zero_into_the_loras():
    model, tok = _model()
    base, _ = resolve_base_model("tiny-random-llama")
    batch = mixed_batch(model, tok, mixed_examples()[:1] * 2, labels=True)
    model.train()
    out = model(**batch)
    out.loss.backward()  # a micro-batch of text samples only: nothing to learn, but no error either
    with torch.no_grad():
        want = base(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.equal(out.logits.detach(), want)
    assert all(float(p.grad.abs().sum()) == 0 for n, p in model.named_parameters() if "lora_" in n)


# --- Phi-4's per-modality dropout and vision-speech projector ------------------------------------------------
def test_each_lora_drops_out_its_input_at_its_modalitys_rate(tmp_path):
    model, tok = _model(vision_dropout=0.0, speech_dropout=0.5)
    batch = mixed_batch(model, tok)  # text, image, audio, image+audio
    with torch.no_grad():
        train, test = model.train()(**batch).logits, model.eval()(**batch).logits
    torch.testing.assert_close(train[[0, 1, 3]], test[[0, 1, 3]])  # text and vision samples: nothing dropped
    assert not torch.allclose(train[2], test[2], atol=1e-5)  # the speech sample's LoRA input is dropped out
    model.save_pretrained(tmp_path / "adapter")
    assert [read_json(tmp_path / f"adapter/{m}-lora/adapter_config.json", "")["lora_dropout"]
            for m in ("vision", "speech")] == [0.0, 0.5]
    folders = {m: tmp_path / f"adapter/{m}-lora" for m in ("vision", "speech")}
    loaded = ModalityLoRAModel.from_peft_folders(resolve_base_model("tiny-random-llama")[0], folders)
    assert (loaded.method_config.vision_dropout, loaded.method_config.speech_dropout) == (0.0, 0.5)
    assert moelora.ModalityLoRAConfig().speech_dropout == 0.01  # Phi-4's speech-lora; its vision-lora has none
    with pytest.raises(moelora.ConfigError, match="method.dropout.*vision_dropout / speech_dropout"):
        moelora.ModalityLoRAConfig(dropout=0.1)


def test_image_and_audio_samples_project_their_audio_with_the_vision_speech_projector():
    model, tok = _model()
    batch = mixed_batch(model, tok)  # text, image, audio, image+audio
    before = _logits(model, batch)
    with torch.no_grad():
        for p in model.encoders.audio.proj_vision_speech.parameters():
            p.add_(torch.randn_like(p))
    after = _logits(model, batch)
    torch.testing.assert_close(after[:3], before[:3])  # audio alone still goes through the speech projector
    assert not torch.allclose(after[3], before[3], atol=1e-4)  # image + audio: through its own projector


def test_a_checkpoint_without_the_vision_speech_projector_loads_unchanged(tmp_path):
    """Saved before the projector existed (no key in its config, no tensors): image+audio audio used the speech
    projector, so loading copies it and every output stays what it was."""
    model, tok = _model(vision_speech_projector=False)
    batch = mixed_batch(model, tok)
    want = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    meta = read_json(tmp_path / "adapter/moelora_config.json", "")
    del meta["config"]["vision_speech_projector"]
    write_json(tmp_path / "adapter/moelora_config.json", meta)
    loaded = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    assert loaded.method_config.vision_speech_projector
    torch.testing.assert_close(_logits(loaded, batch), want)
