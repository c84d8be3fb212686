"""`encoders.position_embedding`: each token of an image or clip carries where it is (issue 18).

Conv features are local and translation-equivariant, and the LM's attention sums values that carry no position
(RoPE acts on queries and keys only), so without a position in the tokens themselves the LM sees a bag of local
features: the layout of a digit's strokes is lost.
"""

import json

import pytest
import torch

from moelora.methods.lora import LoRAConfig
from moelora.model import MoELoRAModel, get_moelora_model
from moelora.multimodal.encoders import EncoderConfig
from moelora.multimodal.model import MediaEncoders

INPUTS = {"image": torch.zeros(1, 3, 16, 16), "audio": torch.zeros(1, 40, 120)}  # nothing anywhere


def _encoders(**cfg) -> MediaEncoders:
    torch.manual_seed(0)
    return MediaEncoders(EncoderConfig(image_grid=4, **cfg), 64, 0.13)


def _distinct(tokens: torch.Tensor) -> int:
    return len({tuple(t) for t in tokens.round(decimals=5).tolist()})


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_fresh_table_changes_nothing_and_learns(kind):
    """Zero-initialised (ViT-style learned positions, started where the encoder without them is): the first
    tokens equal those of the encoder without positions, and the table gets a gradient from the first step."""
    with_pos, without = getattr(_encoders(), kind), getattr(_encoders(position_embedding=False), kind)
    x = torch.rand_like(INPUTS[kind])
    tokens = with_pos(x)
    torch.testing.assert_close(tokens, without(x), rtol=0, atol=0)
    tokens.pow(2).sum().backward()
    assert with_pos.pos.table.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_the_same_content_in_different_places_gives_different_tokens(kind):
    with_pos, without = getattr(_encoders(), kind), getattr(_encoders(position_embedding=False), kind)
    with torch.no_grad():
        with_pos.pos.table.normal_()  # as a trained table: one vector per slot
        assert _distinct(with_pos(INPUTS[kind])[0]) == with_pos.pos.table.shape[0]  # every slot its own token
        # Without it the slots away from the borders see the same blank input and become the same token.
        plain = without(INPUTS[kind])[0]
        assert _distinct(plain) < len(plain)


def test_position_tables_train_with_the_encoders():
    enc = MediaEncoders(EncoderConfig(image_grid=3, audio_tokens=5), 64, 0.13)
    tables = {n: p.shape for n, p in enc.named_parameters() if n.endswith("pos.table")}
    assert tables == {"image.pos.table": torch.Size([9, 64]), "audio.pos.table": torch.Size([5, 64])}


@pytest.mark.parametrize("key, other", [("feature_norm", "position_embedding"), ("position_embedding", "feature_norm")])
def test_folders_saved_before_a_key_load_without_it(tmp_path, key, other):
    """An adapter folder written before `key` existed had encoders without it: it loads so, weights and outputs
    as saved (the other key, which the folder names, keeps its saved value)."""
    from moelora.base_models import resolve_base_model

    torch.manual_seed(0)
    base, _ = resolve_base_model("tiny-random-llama")
    model = get_moelora_model(base, LoRAConfig(r=4, target_modules=["q_proj"]), encoders=EncoderConfig(**{key: False}))
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "moelora_config.json").read_text())
    del meta["encoders"][key]
    (tmp_path / "moelora_config.json").write_text(json.dumps(meta))
    loaded = MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path)
    assert getattr(loaded.encoders.config, key) is False and getattr(loaded.encoders.config, other) is True
    saved, restored = model.encoders.state_dict(), loaded.encoders.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # Same weights; the outputs agree to rounding only: CPU linear takes another kernel when the weights do not
    # require grad (the loaded encoders are frozen), ~1e-10 apart here.
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoders.image(x), model.encoders.image(x), rtol=1e-5, atol=1e-8)
