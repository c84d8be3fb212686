"""Plain LoRA (Hu et al. 2021): the baseline every comparison is made against.

    y = W0 x + (alpha / r) * B A x          (alpha / sqrt(r) with use_rslora, as PEFT)

It is the op with one block of r ranks and a constant gate, so it is mergeable. Parameter layout and
initialisation match PEFT (A kaiming-uniform, B zero), which makes PEFT import/export a renaming.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import MethodConfig
from ..layer import AdapterLayer, kaiming_uniform_
from ..ops import rank_activation
from ..registry import register_method


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

    def __init__(self, base_layer, config: LoRAConfig, context):
        super().__init__(base_layer, config, context)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, dtype=self.adapter_dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=self.adapter_dtype, device=w.device))
        kaiming_uniform_(self.lora_A)
        self.scaling = config.scaling

    def update(self, x, out):
        return rank_activation(x, self.lora_A, self.lora_B, None, None, None, self.scaling, out=out)

    def delta_weight(self):
        return self.scaling * (self.lora_B @ self.lora_A)


register_method("lora", LoRAConfig, LoRALayer)
