"""A fresh encoder's tokens must differ between inputs and sit at the embeddings' scale (issue 18).

Before `feature_norm`, 98% of a fresh image token was the same vector for every picture (PyTorch's default
init and biases) and its RMS 28x below the token embeddings': the frozen LM saw one constant token, and the
image path did not learn. These tests pin the measured properties, not the implementation.
"""

import pytest
import torch

from moelora.data.multimodal import build_multimodal_suite
from moelora.methods.lora import LoRAConfig
from moelora.model import MoELoRAModel, get_moelora_model
from moelora.multimodal.encoders import EncoderConfig
from moelora.multimodal.model import MediaEncoders

EMBED_RMS = 0.1334  # SmolLM2-135M's token embeddings (per-token RMS): the scale the projector aims at


@pytest.fixture(scope="module")
def items():
    train, _ = build_multimodal_suite(["digit_read", "shape_color", "spoken_digit"], n_train_per_task=64,
                                      n_eval_per_task=0, seed=0)
    images = torch.stack([ex["images"][0] for ex in train if ex.get("images")])
    audio = torch.stack([ex["audio"][0] for ex in train if ex.get("audio")])
    return {"image": images, "audio": audio}


def varying_share(tokens: torch.Tensor) -> float:
    """RMS of the part of [n, k, d] tokens that varies between the n items, over the tokens' RMS."""
    return float(tokens.std(0).pow(2).mean().sqrt() / tokens.pow(2).mean().sqrt())


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_fresh_tokens_vary_with_the_input_at_the_embeddings_scale(kind, items):
    torch.manual_seed(0)
    with torch.no_grad():
        new = getattr(MediaEncoders(EncoderConfig(), 576, EMBED_RMS), kind)(items[kind])
        old = getattr(MediaEncoders(EncoderConfig(feature_norm=False), 576, EMBED_RMS), kind)(items[kind])
    assert varying_share(new) > 0.25, varying_share(new)
    assert 0.5 * EMBED_RMS < float(new.pow(2).mean().sqrt()) < 2 * EMBED_RMS
    # Without the norm the conv features (and so the tokens) stay far below the embeddings' scale.
    assert float(old.pow(2).mean().sqrt()) < 0.2 * EMBED_RMS


def test_checkpoints_saved_before_feature_norm_load_without_it(tmp_path):
    from moelora.base_models import resolve_base_model

    torch.manual_seed(0)
    base, _ = resolve_base_model("tiny-random-llama")
    model = get_moelora_model(base, LoRAConfig(r=4, target_modules=["q_proj"]),
                              encoders=EncoderConfig(feature_norm=False))
    model.save_pretrained(tmp_path)
    import json

    meta = json.loads((tmp_path / "moelora_config.json").read_text())
    del meta["encoders"]["feature_norm"]  # as a folder written before the key existed
    (tmp_path / "moelora_config.json").write_text(json.dumps(meta))
    base2, _ = resolve_base_model("tiny-random-llama")
    loaded = MoELoRAModel.from_pretrained(base2, tmp_path)
    assert loaded.encoders.config.feature_norm is False
    saved, restored = model.encoders.state_dict(), loaded.encoders.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # Same weights; the outputs agree to rounding only: CPU linear takes another kernel when the weights do not
    # require grad (the loaded encoders are frozen), ~1e-10 apart here. feature_norm=True would differ by O(1).
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoders.image(x), model.encoders.image(x), rtol=1e-5, atol=1e-8)
