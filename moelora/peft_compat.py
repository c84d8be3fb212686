"""PEFT LoRA folders in and out: our LoRA is PEFT's LoRA with other tensor names.

PEFT saves `base_model.model.<module>.lora_A.weight` [r, d_in] and `...lora_B.weight` [d_out, r]
(for GPT-2's Conv1D too: `fan_in_fan_out` only concerns the base weight) plus `adapter_config.json`.
Only what our LoRA can represent exactly is accepted; anything else is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_tensors, read_json, save_tensors, write_json
from .errors import CheckpointError

PEFT_PREFIX = "base_model.model."
_UNSUPPORTED = {  # adapter_config.json fields whose non-default values our LoRA cannot reproduce
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "bias": ("none",),
}


def read_peft_lora_config(path: Path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, refusing what our LoRA cannot represent exactly."""
    cfg = read_json(path / "adapter_config.json", "PEFT adapter config")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}/adapter_config.json: peft_type {peft_type!r} is not supported here "
                              "(moelora imports PEFT 'LORA' folders)")
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"{path}/adapter_config.json: '{key}': {cfg[key]!r} is not supported by moelora's LoRA")
    return cfg


def peft_weights_file(path: Path) -> Path:
    """The safetensors weights of a PEFT folder; a pickle-only folder is refused by name."""
    weights = path / "adapter_model.safetensors"
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise CheckpointError(f"refusing to load {path}/adapter_model.bin: pickle checkpoints can run arbitrary "
                              "code; save the PEFT adapter with safe_serialization=True")
    return weights


def import_peft_lora(model_cls, base_model, path: Path, base_model_id=None):
    from .methods.lora import LoRAConfig

    if read_json(path / "adapter_config.json", "PEFT adapter config").get("peft_type") == "XLORA":
        from .methods.xlora_peft import import_peft_xlora  # PEFT X-LoRA folders load as our X-LoRA

        return import_peft_xlora(base_model, path, base_model_id)
    cfg = read_peft_lora_config(path)
    target = cfg.get("target_modules")
    if isinstance(target, (set, tuple)):
        target = sorted(target)
    config = LoRAConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])), target_modules=target,
                        dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)))
    weights = peft_weights_file(path)
    tensors = {}
    for key, value in load_tensors(weights).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        tensors[name] = value
    model = model_cls(base_model, config, base_model_id or cfg.get("base_model_name_or_path"))
    model.load_adapter_state_dict(tensors, where=str(weights))
    return model


def peft_base_name(model) -> str | None:
    """What PEFT's `base_model_name_or_path` should hold: the base's local folder (absolute, so
    AutoPeftModelForCausalLM finds it from anywhere) or its Hub id; None for bases built in code."""
    name = str(getattr(getattr(model.base_model, "config", None), "_name_or_path", "") or "")
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return HUB_IDS.get((model.base_model_id or "").split(":")[0]) or (name or None)


# moelora's built-in base names -> the Hub id of the same weights (the zoo's cards name it for PEFT users)
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def peft_lora_config(cfg, base_name: str | None, target_modules, fan_in_fan_out: bool) -> dict:
    """adapter_config.json for our LoRA config `cfg` (PEFT 0.13+ reads it)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def peft_tensors(tensors: dict) -> dict:
    """Our adapter tensors (`<module>.lora_A`) under PEFT's names (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        out[f"{PEFT_PREFIX}{name}.{leaf}.weight"] = value
    return out


def peft_model_card(base_name: str | None, cfg) -> str:
    """README.md of an exported folder: PEFT's model-card front matter and how to load it."""
    base = base_name or "<the base model>"
    return (f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- moelora\n---\n\n"
            f"# LoRA adapter (r={cfg.r}, alpha={cfg.alpha:g}) exported by moelora\n\n"
            f"A plain PEFT LoRA folder for `{base}`, adapting {cfg.target_modules}.\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")\n```\n\n"
            "moelora reads it too: `moelora.MoELoRAModel.from_pretrained(base, \"<this folder>\")`.\n")


def export_peft_lora(model, tensors: dict, folder: Path) -> None:
    cfg = model.method_config
    if cfg.method_name != "lora":
        raise CheckpointError(f"format='peft' writes plain LoRA only; method '{cfg.method_name}' has no PEFT "
                              "equivalent (save it with the default format)")
    from transformers.pytorch_utils import Conv1D

    from .targets import linear_module_names, peft_target_modules

    layers = model.adapter_layers()
    conv1d = any(isinstance(layer.base_layer, Conv1D) for layer in layers.values())
    targets = peft_target_modules(linear_module_names(model.base_model), list(layers))
    base_name = peft_base_name(model)
    write_json(folder / "adapter_config.json", peft_lora_config(cfg, base_name, targets, conv1d))
    save_tensors(folder / "adapter_model.safetensors", peft_tensors(tensors), metadata={"format": "pt"})
    (folder / "README.md").write_text(peft_model_card(base_name, cfg))
