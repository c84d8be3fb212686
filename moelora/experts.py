"""Experts that are whole LoRAs, in one padded bank per module (LoRA-Mixer, X-LoRA).

An expert is a LoRA with its own rank r_e and alpha_e. Every adapted module keeps the E experts of the
model in one bank, the layout `rank_activation` expects with block = r_max:

    lora_A [E*r_max, d_in]    rows e*r_max .. e*r_max+r_e-1 hold expert e's A, the rest are zero
    lora_B [d_out, E*r_max]   columns likewise
    expert_scaling [E]        s_e = alpha_e / r_e (alpha_e / sqrt(r_e) with rsLoRA), multiplied into the gates

The zero padding is exact: padded ranks give x A^T = 0, and both padded factors get zero gradient
(each one's gradient is multiplied by the other, which is zero), so they stay zero while training.

Where the experts come from (`experts:` in the method config):

    experts: 4                            four fresh experts expert_0..expert_3 (A kaiming, B zero: PEFT's init)
    experts: [math, strings]              fresh experts with these names (LoRA-Mixer stage 1: the task names)
    experts: {math: path/to/peft, ...}    PEFT LoRA folders (adapter_config.json + adapter_model.safetensors)
    experts: {math: null}                 a fresh expert inside a mapping
    experts: {math: {r: 16, alpha: 32}}   a fresh expert of its own shape (saved configs use this form)

A PEFT folder must adapt exactly the modules this config targets (else a `CheckpointError` names the
folder and the modules that differ); pickle (`adapter_model.bin`) folders are refused. A checkpoint
saved by moelora keeps the trained bank itself, so its config records each expert's shape (and the
folder it came from, for provenance) instead of a path to re-read.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .config import MethodConfig
from .errors import CheckpointError, ConfigError
from .layer import AdapterLayer, kaiming_uniform_
from .model import MoELoRAModel
from .peft_compat import peft_weights_file, read_lora, read_lora_factors

# LoRA-Mixer's "serial attention routing" adapts the attention projections; X-LoRA's usual experts do too.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_SPEC_KEYS = ("r", "alpha", "use_rslora", "source")


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    name: str
    r: int
    alpha: float
    use_rslora: bool = False
    path: str | None = None  # a PEFT LoRA folder whose weights fill this expert (None: fresh)
    source: str | None = None  # where the weights first came from, kept in saved configs for provenance

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _peft_spec(name: str, value: str, key: str) -> ExpertSpec:
    folder = Path(value)
    if not folder.is_dir():
        raise ConfigError(key, f"PEFT adapter folder not found: {value}")
    lora = read_lora(folder)
    try:
        peft_weights_file(folder)  # refuses a pickle-only or weightless folder by name
    except CheckpointError as exc:
        raise CheckpointError(f"expert '{name}': {exc}") from None
    return ExpertSpec(name, lora.r, lora.alpha, lora.use_rslora, path=str(folder), source=str(folder))


def resolve_expert_specs(experts, r: int, alpha: float, use_rslora: bool, key: str) -> list[ExpertSpec]:
    """The experts an `experts:` value describes (see the module docstring), validated."""
    fresh = dict(r=r, alpha=alpha, use_rslora=use_rslora)
    if isinstance(experts, int):
        if experts < 1:
            raise ConfigError(key, f"must be >= 1 experts, got {experts}")
        return [ExpertSpec(f"expert_{i}", **fresh) for i in range(experts)]
    names = list(experts)
    if not names:
        raise ConfigError(key, "is empty: give a number of experts, a list of names, or {name: PEFT folder}")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(key, f"expert names must be distinct non-empty strings, got {names}")
    if isinstance(experts, list):
        return [ExpertSpec(n, **fresh) for n in names]
    specs = []
    for name, value in experts.items():
        where = f"{key}.{name}"
        if value is None:
            specs.append(ExpertSpec(name, **fresh))
        elif isinstance(value, str):
            specs.append(_peft_spec(name, value, where))
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(_SPEC_KEYS))
            if unknown:
                raise ConfigError(f"{where}.{unknown[0]}", f"unknown key; an expert shape has {', '.join(_SPEC_KEYS)}")
            spec = ExpertSpec(name, int(value.get("r", r)), float(value.get("alpha", alpha)),
                              bool(value.get("use_rslora", use_rslora)), source=value.get("source"))
            if spec.r < 1:
                raise ConfigError(f"{where}.r", f"must be >= 1, got {spec.r}")
            specs.append(spec)
        else:
            raise ConfigError(where, f"expected a PEFT folder path, null or {{r, alpha}}, got {value!r}")
    return specs


@dataclasses.dataclass
class ExpertsConfig(MethodConfig):
    """Fields of methods whose experts are LoRAs (LoRA-Mixer, X-LoRA)."""

    # None: the experts' own target_modules when they are PEFT folders, else the architecture's attention
    # projections (moelora/targets.py)
    target_modules: list[str] | str | None = None
    default_targets: ClassVar[str] = "attention"
    experts: int | list[str] | dict[str, Any] = 4  # fresh count, fresh names, or {name: PEFT folder} (module doc)
    r: int = 8  # rank of fresh experts (PEFT folders bring their own): LoRA-8 per expert, as the X-LoRA anchors
    alpha: float = 16.0  # fresh experts' scaling alpha/r = 2, LLaMA-Factory's default alpha = 2r
    use_rslora: bool = False  # fresh experts scaled alpha/sqrt(r), as PEFT's flag

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise self.error("r", f"must be >= 1, got {self.r}")
        self.expert_specs()

    def expert_specs(self) -> list[ExpertSpec]:
        key = (repr(self.experts), self.r, self.alpha, self.use_rslora)
        cached = self.__dict__.get("_specs")
        if cached is None or cached[0] != key:  # reading PEFT configs once per distinct value
            cached = (key, resolve_expert_specs(self.experts, self.r, self.alpha, self.use_rslora, self._key("experts")))
            self.__dict__["_specs"] = cached
        return cached[1]

    def targets_from_inputs(self) -> list[str] | str | None:
        """The `target_modules` the PEFT expert folders share (None when every expert is fresh)."""
        folders = [s.path for s in self.expert_specs() if s.path is not None]
        if not folders:
            return None
        norm = {f: read_lora(f).target_modules for f in folders}
        if len({repr(t) for t in norm.values()}) > 1:
            raise ConfigError(self._key("target_modules"), "is not given and the PEFT experts target different "
                              f"modules ({norm}); set target_modules to the modules they share")
        return next(iter(norm.values()))

    @property
    def expert_names(self) -> list[str]:
        return [s.name for s in self.expert_specs()]

    def saved_experts(self) -> dict[str, dict]:
        """`experts:` for a saved checkpoint: each expert's shape, no folder to re-read (the bank is saved)."""
        out = {}
        for s in self.expert_specs():
            out[s.name] = {"r": s.r, "alpha": s.alpha, "use_rslora": s.use_rslora}
            if s.source:
                out[s.name]["source"] = s.source
        return out


class ExpertBankLayer(AdapterLayer):
    """An adapted linear holding every expert's LoRA in one padded bank (see the module docstring)."""

    def __init__(self, base_layer, config: ExpertsConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        specs = config.expert_specs()
        w = base_layer.weight
        self.n_experts = len(specs)
        self.block = max(s.r for s in specs)
        rows = self.n_experts * self.block
        # Created in the adapter dtype (fp32 under a 16-bit base) so loaded expert weights are not rounded
        self.lora_A = nn.Parameter(torch.zeros(rows, self.in_features, dtype=self.adapter_dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rows, dtype=self.adapter_dtype, device=w.device))
        with torch.no_grad():
            for e, s in enumerate(specs):
                kaiming_uniform_(self.lora_A.data[e * self.block:e * self.block + s.r])  # fan-in d_in, as PEFT
        scaling = torch.tensor([s.scaling for s in specs], dtype=torch.float32, device=w.device)
        self.register_buffer("expert_scaling", scaling, persistent=False)  # derived from the saved config

    def set_expert(self, e: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy expert e's factors (A [r_e, d_in], B [d_out, r_e]) into the bank."""
        r, lo = A.shape[0], e * self.block
        with torch.no_grad():
            self.lora_A[lo:lo + r].copy_(A.to(self.lora_A.dtype))
            self.lora_A[lo + r:lo + self.block].zero_()
            self.lora_B[:, lo:lo + r].copy_(B.to(self.lora_B.dtype))
            self.lora_B[:, lo + r:lo + self.block].zero_()

    def expert_factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = e * self.block
        return self.lora_A[lo:lo + self.block], self.lora_B[:, lo:lo + self.block]


def read_peft_expert(spec: ExpertSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} of a PEFT LoRA folder (names as in the base model)."""
    return read_lora_factors(spec.path, who=f"expert '{spec.name}' ({spec.path})")


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


class ExpertBankModel(MoELoRAModel):
    """A model whose adapted layers are `ExpertBankLayer`s: fills them from PEFT folders after injection."""

    def __init__(self, base_model, method_config, base_model_id=None):
        super().__init__(base_model, method_config, base_model_id)
        self.load_peft_experts()
        self.set_experts_trainable(self.experts_trainable())

    def experts_trainable(self) -> bool:
        raise NotImplementedError

    def load_peft_experts(self) -> None:
        layers = self.adapter_layers()
        for e, spec in enumerate(self.method_config.expert_specs()):
            if spec.path is None:
                continue
            factors = read_peft_expert(spec)
            missing, extra = set(layers) - set(factors), set(factors) - set(layers)
            if missing or extra:
                raise CheckpointError(
                    f"expert '{spec.name}' ({spec.path}) adapts other modules than method.target_modules="
                    f"{self.method_config.target_modules!r} selects: "
                    + "; ".join(part for part in (f"not in the expert: {_few(missing)}" if missing else "",
                                                  f"not targeted here: {_few(extra)}" if extra else "") if part)
                    + " (set target_modules to the expert's, or use experts trained on the same modules)")
            for name, (A, B) in factors.items():
                layer = layers[name]
                if A.shape != (spec.r, layer.in_features) or B.shape != (layer.out_features, spec.r):
                    raise CheckpointError(
                        f"expert '{spec.name}' ({spec.path}): '{name}' has A {list(A.shape)} and B {list(B.shape)}, "
                        f"expected [{spec.r}, {layer.in_features}] and [{layer.out_features}, {spec.r}] "
                        "(an adapter for another base model?)")
                layer.set_expert(e, A, B)

    def set_experts_trainable(self, flag: bool) -> None:
        for layer in self.adapter_layers().values():
            layer.lora_A.requires_grad_(flag)
            layer.lora_B.requires_grad_(flag)

    def saved_config(self) -> dict:
        meta = super().saved_config()
        meta["config"]["experts"] = self.method_config.saved_experts()
        return meta
