"""Load a PEFT X-LoRA checkpoint folder as our X-LoRA (classifier weights + the expert adapters).

How PEFT 0.21.2 saves X-LoRA (read from `peft/tuners/xlora` and checked by saving one):
  * `adapter_config.json`: `peft_type: "XLORA"`, the classifier options (hidden_size, xlora_depth, ...) and
    `adapters: {name: path}` with the expert folders' paths as given at construction;
  * `adapter_model.safetensors`: only the classifier, keys `base_model.internal_xlora_classifier.layers.<i>.*`;
  * subfolders `0`, `1`, ...: NOT the experts. They hold classifier tensors under LoRA configs.
The experts are therefore read from the `adapters` paths (absolute, relative to the working directory, or
relative to the checkpoint folder), or from `experts=` given to `import_peft_xlora`. PEFT registers them as
"0", "1", ... in the order of `adapters`; module index l is the order of the adapted modules, as ours.

PEFT 0.21.2 drops classifier tensors whose layer index equals an expert's registered name on save (its
per-adapter key filter matches ".0." in "layers.0.weight"), so its own reload re-initialises them at
random. Such a folder is refused here with the missing keys named: there is no way to recover them.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_tensors
from ..errors import CheckpointError
from ..peft_compat import peft_weights_file, read_adapter_config, read_lora
from ..registry import register_peft_importer

_CLASSIFIER = "internal_xlora_classifier."
_OPTIONS = ("xlora_depth", "xlora_size", "xlora_dropout_p", "enable_softmax", "enable_softmax_topk",
            "softmax_temperature", "layerwise_scalings", "top_k_lora", "scaling_pass_value",
            "global_scaling_weight", "use_trainable_adapters")


def _expert_folder(name: str, value: str, checkpoint: Path) -> str:
    for candidate in (Path(value), checkpoint / value):
        if (candidate / "adapter_config.json").is_file():
            return str(candidate)
    raise CheckpointError(f"{checkpoint}/adapter_config.json: expert '{name}' points to {value}, which is not a PEFT "
                          "LoRA folder here (PEFT saves paths, not the experts); pass experts={name: folder} to "
                          "moelora.methods.xlora_peft.import_peft_xlora")


def import_peft_xlora(base_model, path: str | Path, base_model_id: str | None = None,
                      experts: dict[str, str] | None = None):
    """An `XLoRAModel` equal to PEFT's `XLoraModel` for the checkpoint at `path` (in eval mode)."""
    from .xlora import XLoRAConfig, XLoRAModel

    path = Path(path)
    cfg = read_adapter_config(path, "PEFT X-LoRA config")
    if cfg.get("peft_type") != "XLORA":
        raise CheckpointError(f"{path}/adapter_config.json: peft_type {cfg.get('peft_type')!r} is not XLORA")
    adapters = experts if experts is not None else cfg.get("adapters") or {}
    if not adapters:
        raise CheckpointError(f"{path}/adapter_config.json names no expert adapters")
    folders = {name: _expert_folder(name, value, path) for name, value in adapters.items()}
    targets = {name: read_lora(f).target_modules for name, f in folders.items()}
    first = next(iter(targets.values()))
    if any(t != first for t in targets.values()):
        raise CheckpointError(f"{path}: the experts target different modules ({targets}); moelora's X-LoRA needs "
                              "experts on the same modules")
    options = {k: cfg[k] for k in _OPTIONS if k in cfg}
    config = XLoRAConfig(experts=folders, target_modules=first, hidden_size=cfg.get("hidden_size"), **options)
    model = XLoRAModel(base_model, config, base_model_id or cfg.get("base_model_name_or_path"))

    weights = peft_weights_file(path)
    found = {key.split(_CLASSIFIER, 1)[1]: value for key, value in load_tensors(weights).items() if _CLASSIFIER in key}
    own = model.xlora_classifier.state_dict()
    missing, unexpected = sorted(set(own) - set(found)), sorted(set(found) - set(own))
    if missing:
        raise CheckpointError(
            f"{weights} lacks classifier tensors {missing}: PEFT 0.21.2's save_pretrained drops classifier layers "
            "whose index equals an expert name ('0', '1', ...), and PEFT's own reload re-initialises them at random. "
            "Save the classifier's full state (every key of internal_xlora_classifier) to load it here.")
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected classifier tensors {unexpected} (another xlora_depth?)")
    for key, value in found.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{weights}: classifier tensor '{key}' has shape {list(value.shape)}, this base "
                                  f"model and config need {list(own[key].shape)}")
    model.xlora_classifier.load_state_dict(found)
    return model.eval()


# PEFT X-LoRA folders (peft_type XLORA) load as our X-LoRA through MoELoRAModel.from_pretrained.
register_peft_importer("XLORA", lambda model_cls, base_model, path, base_model_id=None:
                       import_peft_xlora(base_model, path, base_model_id))
