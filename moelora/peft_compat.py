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


def export_peft_lora(model, tensors: dict, folder: Path) -> None:
    cfg = model.method_config
    if cfg.method_name != "lora":
        raise CheckpointError(f"format='peft' writes plain LoRA only; method '{cfg.method_name}' has no PEFT "
                              "equivalent (save it with the default format)")
    from transformers.pytorch_utils import Conv1D

    layers = model.adapter_layers()
    conv1d = any(isinstance(layer.base_layer, Conv1D) for layer in layers.values())
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.base_model_id or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    })
    peft_tensors = {}
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        peft_tensors[f"{PEFT_PREFIX}{name}.{leaf}.weight"] = value
    save_tensors(folder / "adapter_model.safetensors", peft_tensors, metadata={"format": "pt"})
