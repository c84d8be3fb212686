"""Layers are told where they sit when they are built (name, index among the adapted modules, transformer block),
so a method can size its bank per layer: a test-only method with a rank per transformer block (MoLA-style
per-layer expert counts) trains, saves and reloads with a different bank shape in every block."""

import dataclasses

import pytest
import torch
from torch import nn

import moelora
from moelora.base_models import resolve_base_model
from moelora.config import MethodConfig
from moelora.layer import AdapterLayer, kaiming_uniform_
from moelora.ops import rank_activation
from moelora.registry import METHODS, register_method
from tests.conftest import randomize_adapters


@dataclasses.dataclass
class PerBlockConfig(MethodConfig):
    ranks: list = dataclasses.field(default_factory=lambda: [2, 5])  # rank-1 experts per transformer block
    alpha: float = 4.0  # scale alpha / rank


class PerBlockLayer(AdapterLayer):
    def __init__(self, base_layer, config, context, site):
        super().__init__(base_layer, config, context, site)
        r = config.ranks[self.site.block]  # the bank's size depends on where the layer sits
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))
        kaiming_uniform_(self.lora_A)
        self.scaling = config.alpha / r

    def update(self, x, out):
        return rank_activation(x, self.lora_A, self.lora_B, None, None, None, self.scaling, out=out)


@pytest.fixture
def tiny_llama_model(tiny_llama):
    return tiny_llama[0]


@pytest.fixture
def per_block_method():
    register_method("test_per_block", PerBlockConfig, PerBlockLayer)
    try:
        yield
    finally:
        METHODS.pop("test_per_block")


def test_every_layer_knows_its_site_when_built(tiny_llama_model):
    model = moelora.get_moelora_model(tiny_llama_model, moelora.LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
    layers = model.adapter_layers()
    sites = [layer.site for layer in layers.values()]
    assert [s.name for s in sites] == list(layers) and [s.index for s in sites] == list(range(len(layers)))
    assert {s.count for s in sites} == {len(layers)} == {4}
    assert [s.block for s in sites] == [0, 0, 1, 1]  # model.layers.<block>.{self_attn.q_proj, mlp.down_proj}
    assert {s.n_blocks for s in sites} == {tiny_llama_model.config.num_hidden_layers}


def test_a_method_sizes_its_bank_per_block_and_reloads(tiny_llama_model, batch, per_block_method, tmp_path):
    cfg = PerBlockConfig(ranks=[2, 5], target_modules=["q_proj", "v_proj"])
    model = moelora.get_moelora_model(tiny_llama_model, cfg)
    ranks = {name: layer.lora_A.shape[0] for name, layer in model.adapter_layers().items()}
    assert ranks == {f"model.layers.{b}.self_attn.{p}": [2, 5][b] for b in (0, 1) for p in ("q_proj", "v_proj")}
    randomize_adapters(model)
    want = model(**batch).logits
    model.save_pretrained(tmp_path / "a")
    again = moelora.MoELoRAModel.from_pretrained(resolve_base_model("tiny-random-llama")[0], tmp_path / "a")
    assert {n: layer.lora_A.shape[0] for n, layer in again.adapter_layers().items()} == ranks
    torch.testing.assert_close(again(**batch).logits, want)


def test_xlora_layers_take_their_classifier_column_from_the_site(tiny_llama_model):
    xlora = moelora.get_moelora_model(tiny_llama_model, moelora.XLoRAConfig(experts=2, r=2, target_modules=["q_proj", "v_proj"]))
    assert [layer.layer_index for layer in xlora.xlora_layers] == [0, 1, 2, 3]
    assert xlora.xlora_classifier.n_layers == 4
