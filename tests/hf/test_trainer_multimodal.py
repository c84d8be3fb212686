"""Multimodal moelora models under a plain `transformers.Trainer`: `MultimodalCollator` as the data_collator,
default Trainer arguments (remove_unused_columns=True keeps the media columns), encoders in every checkpoint.

Cases come from tests/method_cases.py: every row whose model is multimodal by nature (ROW_INPUTS), and every
text method built with `encoders=EncoderConfig()` (methods with a forward of their own included: the encoders
run in a forward pre-hook, and Trainer must still keep the media columns for them).
"""

import pytest
import torch
from safetensors.torch import load_file

import moelora
from moelora.base_models import build_tiny_tokenizer
from moelora.data.media import MultimodalCollator, encode_multimodal_examples
from moelora.multimodal import EncoderConfig
from tests.hf.test_trainer import _count_router_updates, tied_llama, trainer
from tests.method_cases import METHOD_CASES, ROW_INPUTS, TEXT_METHODS
from tests.multimodal_batches import mixed_batch, mixed_examples

datasets = pytest.importorskip("datasets")


# (method, add encoders): multimodal rows as they are, every text method with encoders added
CASES = [(m, False) for m in ROW_INPUTS] + [(m, True) for m in TEXT_METHODS]


def _model(method, encoders):
    torch.manual_seed(0)
    return moelora.get_moelora_model(tied_llama(), {"name": method, **METHOD_CASES[method]},
                                     encoders=EncoderConfig() if encoders else None)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _dataset(model, tokenizer):
    """Text, image, audio and image+audio rows (twice) as a `datasets.Dataset`, features stored as lists."""
    encoded = encode_multimodal_examples(tokenizer, mixed_examples() + mixed_examples(seed=1), 256,
                                         model.media_tokens)
    listed = [{k: [x.tolist() for x in v] if k in ("images", "audio") else v for k, v in row.items()}
              for row in encoded]
    return datasets.Dataset.from_list(listed)


@pytest.mark.parametrize("method,encoders", CASES, ids=[f"{m}{'+encoders' if e else ''}" for m, e in CASES])
def test_multimodal_trainer_trains_checkpoints_encoders_and_resumes(method, encoders, tmp_path):
    tokenizer = build_tiny_tokenizer()  # 259 tokens, as tied_llama
    model = _model(method, encoders)
    data = _dataset(model, tokenizer)
    collator = MultimodalCollator(tokenizer.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    updates = _count_router_updates(model)
    run = trainer(model, tmp_path / "run", data=data, data_collator=collator)
    run.train()

    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.startswith("encoders.image.") for n in changed)  # the image and audio columns reached the model
    assert any(n.startswith("encoders.audio.") for n in changed)
    assert any(not n.startswith("encoders.") for n in changed)  # and the adapters trained with them
    assert any("eval_loss" in h for h in run.state.log_history)
    if any(layer.step_counts() is not None for layer in model.adapter_layers().values()):
        assert len(updates) == 2  # router state once per optimizer step (2 steps x 2 micro-batches)
    if method == "smora":
        assert next(iter(model.adapter_layers().values())).bias.abs().max() > 0  # beta moved

    # checkpoint-2: the encoders are in Trainer's own state (for its resume) and in the moelora folder
    ckpt = tmp_path / "run" / "checkpoint-2"
    trainer_state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("encoders.image.") for k in trainer_state)
    assert not any("embed_tokens" in k or "lm_head" in k for k in trainer_state)
    batch = mixed_batch(model, tokenizer, mixed_examples(seed=5))
    want = _logits(model, batch)
    reloaded = moelora.MoELoRAModel.from_pretrained(tied_llama(), ckpt)
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, batch), want)

    # Trainer's own resume from checkpoint-1 reaches the same adapter and encoders as the uninterrupted run
    resumed = _model(method, encoders)
    again = trainer(resumed, tmp_path / "run", data=data, data_collator=collator)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert again.state.global_step == 2
    torch.testing.assert_close(_logits(resumed, batch), want, atol=1e-5, rtol=1e-4)


def test_per_part_rates_reach_a_trainer_through_parameter_groups(tmp_path):
    """train.py's encoder_/projector_learning_rate in a Trainer script: the optimizer's groups come from
    moelora.parameter_groups. The image encoder and projector at rate 0 stay exactly as they were while the
    audio ones and the adapters train, under Trainer's own scheduler."""
    from transformers import Trainer, TrainingArguments

    tokenizer = build_tiny_tokenizer()
    model = _model("lora", True)
    groups = moelora.parameter_groups(model, 1e-2, encoder_learning_rate={"image": 0.0},
                                      projector_learning_rate={"image": 0.0})
    assert [g["name"] for g in groups] == ["adapters", "encoders.image", "encoders.audio", "projectors.image",
                                           "projectors.audio"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_steps=2,
                             per_device_train_batch_size=2, logging_steps=1, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_dataset(model, tokenizer),
            data_collator=MultimodalCollator(tokenizer.pad_token_id),
            optimizers=(torch.optim.AdamW(groups, weight_decay=0.0), None)).train()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert not any(n.startswith("encoders.image.") for n in changed)
    assert any(n.startswith("encoders.audio.proj") for n in changed)
    assert any(n.startswith("encoders.audio.conv") for n in changed)
    assert any(not n.startswith("encoders.") for n in changed)


def test_parameter_groups_name_a_bad_modality():
    with pytest.raises(moelora.ConfigError, match="encoder_learning_rate.*names video; the modalities are image"):
        moelora.parameter_groups(_model("lora", True), 1e-3, encoder_learning_rate={"video": 1e-3})


def test_soft_words_pretrained_then_frozen_under_a_trainer_reload_bound_to_the_lm(tmp_path):
    """The perceiving recipe (configs/perceive/) in a Trainer script: `pretrain_encoders` with the tokenizer
    teaches the words projectors their captions, the encoders are frozen, Trainer trains the adapters alone,
    and its checkpoint reloads with the projectors reading the reloaded LM's embeddings and the same logits."""
    from moelora.data.multimodal import build_multimodal_suite
    from moelora.multimodal.pretraining import pretrain_encoders

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = moelora.get_moelora_model(tied_llama(), {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                      encoders=EncoderConfig(projector="words", image_width=8, audio_width=8))
    train_set, eval_set = build_multimodal_suite(["digit_read", "spoken_digit"], 6, 4, seed=0)
    report = pretrain_encoders(model.encoders, train_set, eval_set, steps=3, seed=0, tokenizer=tokenizer)
    assert "captions" in report["image"]["held-out accuracy"] and "captions" in report["audio"]["held-out accuracy"]
    model.encoders.requires_grad_(False)  # train.py's freeze_encoders + freeze_projectors
    pretrained = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    encoded = encode_multimodal_examples(tokenizer, train_set, 256, model.media_tokens)
    data = datasets.Dataset.from_list([{k: [x.tolist() for x in v] if k in ("images", "audio") else v
                                        for k, v in row.items()} for row in encoded])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer(model, tmp_path / "run", data=data, data_collator=MultimodalCollator(tokenizer.pad_token_id)).train()

    assert all(torch.equal(v, pretrained[k]) for k, v in model.encoders.state_dict().items())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    batch = mixed_batch(model, tokenizer, eval_set)
    want = _logits(model, batch)
    reloaded = moelora.MoELoRAModel.from_pretrained(tied_llama(), tmp_path / "run" / "checkpoint-2")
    assert reloaded.encoders.image.proj._embedding is reloaded.base_model.get_input_embeddings()
    assert reloaded.encoders.image.proj.vocab_ids.equal(model.encoders.image.proj.vocab_ids)
    torch.testing.assert_close(_logits(reloaded, batch), want)
