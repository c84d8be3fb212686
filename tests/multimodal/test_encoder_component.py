"""Encoders as a component any method's model owns (issue 16): every method of the matrix, with image/audio
encoders attached, trains them, generates from media, turns them off under disable_adapter, saves and reloads."""

import pytest
import torch

import moelora
from moelora.base_models import build_tiny_tokenizer, resolve_base_model
from moelora.model import MoELoRAModel
from moelora.multimodal import EncoderConfig
from moelora.registry import get_method
from tests.conftest import randomize_adapters
from tests.method_cases import METHOD_CASES, TEXT_METHODS
from tests.multimodal_batches import mixed_batch

SMALL = EncoderConfig(image_width=8, audio_width=8)


def _model(method):
    torch.manual_seed(0)
    base, _ = resolve_base_model("tiny-random-llama")
    model = moelora.get_moelora_model(base, {"name": method, **METHOD_CASES[method]}, encoders=SMALL)
    randomize_adapters(model)  # zero-initialised LoRA B factors would hide a wrong load
    return model


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_every_method_owns_encoders(method, tmp_path):
    model = _model(method)
    tokenizer = build_tiny_tokenizer()
    # the method's own model class (no multimodal subclass), owning the encoders
    assert type(model) is (get_method(method).model_cls or MoELoRAModel) and model.media_tokens == {"image": 4, "audio": 8}
    batch = mixed_batch(model, tokenizer, labels=True)
    if method in ("lora_mixer", "meteora"):  # task-routed methods get one label per sample
        batch["sample_labels"] = torch.tensor([0, 1, 2, 0])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for kind in ("image", "audio"):  # the media reached the LM through the encoders: both get gradients
        grads = [p.grad for p in getattr(model.encoders, kind).parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, kind

    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # disable_adapter: adapters and encoders off, so the model is the base LM reading the placeholder ids
        with model.disable_adapter():
            off = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            assert not model.encoders.enabled
        assert model.encoders.enabled
        with model.disable_adapter():
            base = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(off, base, rtol=0, atol=0)
        assert not torch.allclose(logits, off)  # the encoders' tokens changed what the LM reads

    model.save_pretrained(tmp_path / "adapter")
    loaded = MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "adapter")
    assert loaded.encoder_config == SMALL and type(loaded) is type(model)
    with torch.no_grad():
        again = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_every_method_generates_from_media(method):
    """generate() prefills from the encoders' embeddings (X-LoRA's own two-cache decoding too): the decoder's
    first call reads exactly `encoders.embed(...)`, the prompt ids come back followed by the new tokens."""
    model = _model(method).eval()
    tokenizer = build_tiny_tokenizer()
    batch = mixed_batch(model, tokenizer)
    kwargs = {"sample_labels": torch.tensor([0, 1, 2, 0])} if method in ("lora_mixer", "meteora") else {}
    seen = []
    hook = model.base_model.model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("inputs_embeds")), with_kwargs=True)
    try:
        out = model.generate(**batch, **kwargs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    out = out.sequences if hasattr(out, "sequences") else out
    assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"]) and out.shape[1] == batch["input_ids"].shape[1] + 2
    with torch.no_grad():
        want = model.encoders.embed(model, batch["input_ids"], batch["media_mask"], batch["images"], batch["audio"])
    first = next(e for e in seen if e is not None)  # X-LoRA's scaling pass reads them too
    torch.testing.assert_close(first, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m in TEXT_METHODS if m != "xlora"])  # X-LoRA's loop returns ids only
def test_generated_scores_depend_on_the_image(method):
    model = _model(method).eval()
    tokenizer = build_tiny_tokenizer()
    batch = mixed_batch(model, tokenizer)
    kwargs = {"sample_labels": torch.tensor([0, 1, 2, 0])} if method in ("lora_mixer", "meteora") else {}
    scores = []
    for scale in (1.0, -5.0):  # the same prompts with other pixels
        media = {**batch, "images": batch["images"] * scale}
        out = model.generate(**media, **kwargs, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        scores.append(out.scores[0])
    assert not torch.allclose(scores[0][[1, 3]], scores[1][[1, 3]])  # the rows with an image
    torch.testing.assert_close(scores[0][[0, 2]], scores[1][[0, 2]], rtol=0, atol=1e-5)  # the others: unchanged


def test_xlora_cached_and_uncached_decoding_agree_with_media():
    """X-LoRA's uncached path re-runs the whole sequence: the prompt from its embeddings, the new tokens by id."""
    model = _model("xlora").eval()
    tokenizer = build_tiny_tokenizer()
    batch = mixed_batch(model, tokenizer)
    runs = [model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=cache,
                           pad_token_id=tokenizer.pad_token_id) for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
