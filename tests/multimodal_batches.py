"""Mixed text/image/audio batches for model tests: random pixels and random log-mel features, so model
tests need neither scikit-learn's scans nor espeak-ng (the data tests cover those)."""

import torch

from moelora.data.media import MultimodalCollator, encode_multimodal_examples


def mixed_examples(seed: int = 0) -> list[dict]:
    """Text, image, audio and image+audio samples (in that order)."""
    g = torch.Generator().manual_seed(seed)

    def image():
        return torch.rand(3, 16, 16, generator=g)

    def clip():
        return torch.randn(40, 160, generator=g)

    return [
        {"task": "text", "instruction": "What is 2 + 3?", "response": "5"},
        {"task": "image", "instruction": "<image>\nWhat digit is shown?", "response": "7", "images": [image()]},
        {"task": "audio", "instruction": "<audio>\nWhich digit is spoken?", "response": "4", "audio": [clip()]},
        {"task": "both", "instruction": "<image> <audio>\nSame digit?", "response": "yes", "images": [image()],
         "audio": [clip()]},
    ]


def mixed_batch(model, tokenizer, examples=None, labels: bool = False) -> dict:
    """Encoded + collated (right padding) model inputs; `labels` keeps the response-only labels."""
    examples = mixed_examples() if examples is None else examples
    encoded = encode_multimodal_examples(tokenizer, examples, 256, model.media_tokens)
    batch = MultimodalCollator(tokenizer.pad_token_id)(encoded)
    batch.pop("tasks")
    if not labels:
        batch.pop("labels")
    return batch


def base_inputs(model, batch) -> dict:
    """What the plain base LM must be fed to see what `model` sees (encoder tokens over the placeholders)."""
    with torch.no_grad():
        embeds = model.encoders.embed(model, batch["input_ids"], batch["media_mask"], batch.get("images"), batch.get("audio"))
    return {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}


def soft_words_model(frozen_encoders: bool = False):
    """(model, tokenizer): a tiny Llama, LoRA on q, v, soft-words encoders (the default, autoregressive writer)
    whose projectors may write 20 of its tokens, as after encoder pretraining; `frozen_encoders` as the
    perceive recipe's LM stage."""
    import moelora
    from moelora.base_models import resolve_base_model
    from moelora.multimodal import EncoderConfig

    torch.manual_seed(0)
    base, tokenizer = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                                      encoders=EncoderConfig(projector="words", image_width=8, audio_width=8))
    for encoder in (model.encoders.image, model.encoders.audio):
        encoder.proj.set_vocabulary(list(range(10, 30)))
    if frozen_encoders:
        model.encoders.requires_grad_(False)
    return model, tokenizer
