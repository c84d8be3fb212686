"""`encoders.token_norm` (opt-in): projected media tokens stay at the token embeddings' scale through training.

Without it the trained encoders' tokens grew to 20-60x the embeddings' RMS (benchmarks/RESULTS.md §14): in a
pre-norm LM the residual stream at such a position is then its input at every layer.
"""

import pytest
import torch

from moelora.multimodal.encoders import EncoderConfig, TokenScale
from moelora.multimodal.model import MediaEncoders

EMBED_STD = 0.13
INPUTS = {"image": lambda: torch.rand(4, 3, 16, 16), "audio": lambda: torch.randn(4, 40, 120)}


def _rms(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.pow(2).mean(-1).sqrt()


def _encoder(kind: str, token_norm: bool = True):
    torch.manual_seed(0)
    return getattr(MediaEncoders(EncoderConfig(image_grid=4, token_norm=token_norm), 64, EMBED_STD), kind)


def _push_up(encoder, x, steps=30):
    """What the LM's gradient did to our encoders: Adam steps that make the tokens larger."""
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (-encoder(x).pow(2).mean()).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_tokens_keep_the_embedding_scale_however_the_weights_move(kind):
    x = INPUTS[kind]()
    normed, plain = _encoder(kind), _encoder(kind, token_norm=False)
    _push_up(normed, x)
    _push_up(plain, x)
    with torch.no_grad():
        torch.testing.assert_close(_rms(normed(x)), torch.full((4, normed(x).shape[1]), EMBED_STD), rtol=1e-4, atol=0)
        assert _rms(plain(x)).mean() > 10 * EMBED_STD  # the failure it prevents


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_the_direction_still_learns(kind):
    """Only the scale is fixed: the tokens' directions follow the input and get a gradient."""
    enc = _encoder(kind)
    x = INPUTS[kind]()
    tokens = enc(x)
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)  # different inputs, different tokens
    tokens[..., 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()
               if n.startswith("proj") or n.startswith("conv.0"))


def test_the_scale_is_exact_in_bf16_and_adds_no_checkpoint_keys():
    scale = TokenScale(EMBED_STD)
    x = (torch.randn(2, 5, 64) * 300).bfloat16()  # squares of these overflow nothing in fp32
    out = scale(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(_rms(out.float()), torch.full((2, 5), EMBED_STD), rtol=1e-2, atol=0)
    assert scale.state_dict() == {}
    normed, plain = _encoder("image"), _encoder("image", token_norm=False)
    assert normed.state_dict().keys() == plain.state_dict().keys()
