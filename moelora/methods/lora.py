"""Plain LoRA (Hu et al. 2021): the baseline every comparison is made against.

    y = W0 x + (alpha / r) * B A x          (alpha / sqrt(r) with use_rslora, as PEFT)

It is the op with one block of r ranks and a constant gate, so it is mergeable. Parameter layout and
initialisation match PEFT (A kaiming-uniform, B zero), which makes PEFT import/export a renaming: plain PEFT
LoRA folders load as this method, and `save_pretrained(format="peft")` writes one (registered below).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from ..config import MethodConfig
from ..layer import AdapterLayer, kaiming_uniform_
from ..ops import rank_activation
from ..peft_compat import (model_lora_config, peft_model_card, peft_weights_file, read_lora, read_lora_factors,
                           write_lora_folder)
from ..registry import register_method, register_peft_importer


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    r: int = 8  # rank; LoRA-8 and LoRA-64 are the baselines SMoRA-64/8 is compared with
    alpha: float = 16.0  # scale alpha/r = 2, LLaMA-Factory's default alpha = 2r
    use_rslora: bool = False  # alpha/sqrt(r) scaling (Kalajdzievski 2023), as PEFT's flag

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise self.error("r", f"must be >= 1, got {self.r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALayer(AdapterLayer):
    mergeable = True

    def __init__(self, base_layer, config: LoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, dtype=self.adapter_dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=self.adapter_dtype, device=w.device))
        kaiming_uniform_(self.lora_A)
        self.scaling = config.scaling

    def update(self, x, out):
        return rank_activation(x, self.lora_A, self.lora_B, None, None, None, self.scaling, out=out)

    def delta_weight(self):
        return self.scaling * (self.lora_B @ self.lora_A)


# --- PEFT LoRA folders: our LoRA is PEFT's LoRA with other tensor names --------------------------------
def import_peft_lora(model_cls, base_model, path: Path, base_model_id=None):
    """A PEFT LoRA folder as our LoRA, on `base_model` (same weights, same outputs)."""
    lora = read_lora(path)
    config = LoRAConfig(r=lora.r, alpha=lora.alpha, target_modules=lora.target_modules, dropout=lora.dropout,
                        use_rslora=lora.use_rslora)
    tensors = {}
    for module, (A, B) in read_lora_factors(path).items():
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = A, B
    model = model_cls(base_model, config, base_model_id or lora.base_model)
    model.load_adapter_state_dict(tensors, where=str(peft_weights_file(path)))
    return model


def export_peft_lora(model, tensors: dict, folder: Path) -> None:
    """`save_pretrained(format="peft")`: a folder PEFT's LoRA loads, with a model card."""
    cfg = model.method_config
    config = model_lora_config(model, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
    layers = model.adapter_layers()
    factors = {name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]) for name in layers}
    write_lora_folder(folder, config, factors, card=peft_model_card(config["base_model_name_or_path"], cfg))


register_method("lora", LoRAConfig, LoRALayer, peft_exporter=export_peft_lora)
register_peft_importer("LORA", import_peft_lora)
