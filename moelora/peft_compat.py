"""The PEFT LoRA folder format, in one place: every PEFT folder moelora reads or writes goes through here.

A PEFT LoRA folder is `adapter_config.json` plus `adapter_model.safetensors`, whose keys are
`base_model.model.<module>.lora_A.weight` [r, d_in] and `...lora_B.weight` [d_out, r] (for GPT-2's Conv1D
too: `fan_in_fan_out` only concerns the base weight). Only what a plain LoRA represents exactly is read;
any other option (DoRA, rank/alpha patterns, biases, ...) is refused by name, so no folder ever loads
with a scale or shape other than the one PEFT would use.

Nothing here names a method. What a PEFT folder becomes (a LoRA, an X-LoRA, ...) and which methods export
PEFT folders is registered by the methods (`moelora.registry.register_peft_importer`, `register_method(...,
peft_exporter=...)`); methods whose experts are PEFT folders read them with `read_lora`/`read_lora_factors`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import load_tensors, read_json, save_tensors, write_json
from .errors import CheckpointError, short_repr

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_UNSUPPORTED = {  # adapter_config.json fields whose non-default values a plain LoRA cannot reproduce
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "bias": ("none",),
}
# moelora's built-in base names -> the Hub id of the same weights (the zoo's cards name it for PEFT users)
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def normalise_targets(target_modules):
    """PEFT's `target_modules` as one comparable value: a sorted list of names, or a regex string (or None)."""
    if isinstance(target_modules, (list, tuple, set)):
        return sorted(target_modules)
    return target_modules


@dataclasses.dataclass(frozen=True)
class PeftLoRA:
    """A validated PEFT LoRA adapter_config.json."""

    path: Path  # the folder
    r: int
    alpha: float  # lora_alpha (PEFT's default: r)
    dropout: float  # lora_dropout
    use_rslora: bool  # scale alpha / sqrt(r) instead of alpha / r
    target_modules: list[str] | str | None  # normalised (normalise_targets)
    base_model: str | None  # base_model_name_or_path

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


def read_adapter_config(path: Path, what: str = "PEFT adapter config") -> dict:
    """adapter_config.json of a PEFT folder, any peft_type (a JSON object, else a CheckpointError)."""
    return read_json(Path(path) / CONFIG_FILE, what)


def read_lora(path: str | Path) -> PeftLoRA:
    """The LoRA config of a PEFT folder, refusing other peft_types, options a plain LoRA cannot reproduce and
    fields of the wrong type (each by name, in one line)."""
    path = Path(path)
    where = path / CONFIG_FILE
    cfg = read_adapter_config(path)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not a PEFT LoRA (expected 'LORA')")
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"{where}: '{key}': {short_repr(cfg[key])} is not supported by moelora "
                                  "(only what a plain LoRA represents exactly is read)")
    try:
        r = int(cfg["r"])
        lora = PeftLoRA(path, r, float(cfg.get("lora_alpha", r)), float(cfg.get("lora_dropout", 0.0) or 0.0),
                        bool(cfg.get("use_rslora", False)), normalise_targets(cfg.get("target_modules")),
                        cfg.get("base_model_name_or_path"))
    except (TypeError, ValueError, KeyError) as exc:  # r: "x", no "r": name the file, not a traceback line
        raise CheckpointError(f"PEFT adapter config {where} has a missing or wrongly typed field: {type(exc).__name__}: "
                              f"{short_repr(str(exc))}") from None
    if lora.r < 1:
        raise CheckpointError(f"{where}: 'r' must be >= 1, got {lora.r}")
    return lora


def peft_weights_file(path: str | Path) -> Path:
    """The safetensors weights of a PEFT folder; a pickle-only or weightless folder is refused by name."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"refusing to load {path}/adapter_model.bin: pickle checkpoints can run arbitrary "
                                  "code; save the PEFT adapter with safe_serialization=True")
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    return weights


def read_lora_factors(path: str | Path, who: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in the base model: (A [r, d_in], B [d_out, r])} of a PEFT LoRA folder. A tensor that is not
    a linear layer's LoRA factor, or a module without both, is refused (`who` names the folder's role)."""
    weights = peft_weights_file(path)
    who = who or str(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(weights).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                factors.setdefault(name[:-len(suffix)], {})[part] = value
                break
        else:
            raise CheckpointError(f"{who}: tensor '{key}' is not a LoRA factor; only lora_A/lora_B of linear "
                                  "layers are read")
    for module, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{who}: module '{module}' lacks lora_A or lora_B")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in factors.items()}


# --- writing --------------------------------------------------------------------------------------------
def peft_base_name(model) -> str | None:
    """What PEFT's `base_model_name_or_path` should hold: the base's local folder (absolute, so
    AutoPeftModelForCausalLM finds it from anywhere) or its Hub id; None for bases built in code."""
    name = str(getattr(getattr(model.base_model, "config", None), "_name_or_path", "") or "")
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return HUB_IDS.get((model.base_model_id or "").split(":")[0]) or (name or None)


def lora_config_dict(r: int, alpha: float, dropout: float, target_modules, base_name: str | None,
                     fan_in_fan_out: bool, use_rslora: bool = False) -> dict:
    """adapter_config.json of a plain LoRA (PEFT 0.13+ reads it)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def model_lora_config(model, r: int, alpha: float, dropout: float, use_rslora: bool = False) -> dict:
    """`lora_config_dict` for a LoRA over exactly the modules `model` adapts: target_modules normalised the way
    PEFT selects modules (leaf names when they select no more, else a regex), fan_in_fan_out for Conv1D bases."""
    from transformers.pytorch_utils import Conv1D

    from .targets import linear_module_names, peft_target_modules

    layers = model.adapter_layers()
    conv1d = any(isinstance(layer.base_layer, Conv1D) for layer in layers.values())
    targets = peft_target_modules(linear_module_names(model.base_model), list(layers))
    return lora_config_dict(r, alpha, dropout, targets, peft_base_name(model), conv1d, use_rslora)


def peft_lora_config(cfg, base_name: str | None, target_modules, fan_in_fan_out: bool) -> dict:
    """adapter_config.json for a LoRA config object `cfg` (r, alpha, dropout, use_rslora)."""
    return lora_config_dict(cfg.r, cfg.alpha, cfg.dropout, target_modules, base_name, fan_in_fan_out, cfg.use_rslora)


def peft_tensors(tensors: dict) -> dict:
    """Adapter tensors under moelora's names (`<module>.lora_A`) under PEFT's (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        out[f"{PEFT_PREFIX}{name}.{leaf}.weight"] = value
    return out


def write_lora_folder(folder: Path, config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      card: str | None = None) -> None:
    """Write a PEFT LoRA folder: `config` (a `lora_config_dict`), {module: (A, B)} and optionally a README.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, config)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = A.contiguous(), B.contiguous()
    save_tensors(folder / WEIGHTS_FILE, peft_tensors(tensors), metadata={"format": "pt"})
    if card is not None:
        (folder / "README.md").write_text(card)


def peft_model_card(base_name: str | None, cfg) -> str:
    """README.md of an exported folder: PEFT's model-card front matter and how to load it."""
    base = base_name or "<the base model>"
    return (f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- moelora\n---\n\n"
            f"# LoRA adapter (r={cfg.r}, alpha={cfg.alpha:g}) exported by moelora\n\n"
            f"A plain PEFT LoRA folder for `{base}`, adapting {cfg.target_modules}.\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")\n```\n\n"
            "moelora reads it too: `moelora.MoELoRAModel.from_pretrained(base, \"<this folder>\")`.\n")
