"""A fresh encoder's tokens must differ between inputs and sit at the embeddings' scale (issue 18).

Before `feature_norm`, 98% of a fresh image token was the same vector for every picture (PyTorch's default
init and biases) and its RMS 28x below the token embeddings': the frozen LM saw one constant token, and the
image path did not learn. These tests pin the measured properties, not the implementation.
"""

import pytest
import torch

from moelora.data.multimodal import build_multimodal_suite
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
