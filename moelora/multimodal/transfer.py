"""`init_encoders_from`: start a run's encoders + projectors from an earlier run's (e.g. the align stage's).

The earlier run's adapter folder is read as files, safetensors and JSON only (no model is built for it): its
moelora_config.json must hold the same encoder config as this run's, and its encoder tensors (keys
`encoders.*` of adapter_model.safetensors, or modality routing's encoders.safetensors) must cover this model's.
Its adapters are not read: the align stage trains none. A pretrained backbone the folder does not hold (it was
frozen there) keeps the weights of its own model folder, which the matching config names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter_folder import CONFIG_NAME, WEIGHTS_NAME, is_moelora_folder, read_moelora_folder
from ..checkpoint import first_non_finite, load_tensors
from ..errors import ConfigError
from .model import saved_encoder_config

ENCODERS_NAME = "encoders.safetensors"  # modality routing's own encoder file


def adapter_folder(folder: str, key: str) -> Path:
    """A run folder's `adapter/`, or the folder itself when it is an adapter folder."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(key, f"folder not found: {folder}")
    for candidate in (root / "adapter", root):
        if is_moelora_folder(candidate):
            return candidate
    raise ConfigError(key, f"{folder} holds no moelora adapter ({CONFIG_NAME}, or adapter/{CONFIG_NAME})")


def saved_encoder_tensors(adapter: Path, key: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a saved adapter folder, keyed as in `MediaEncoders.state_dict()`."""
    if (adapter / ENCODERS_NAME).is_file():
        return load_tensors(adapter / ENCODERS_NAME)
    if not (adapter / WEIGHTS_NAME).is_file():
        raise ConfigError(key, f"{adapter} has neither {ENCODERS_NAME} nor {WEIGHTS_NAME}")
    return {k[len("encoders."):]: v for k, v in load_tensors(adapter / WEIGHTS_NAME).items() if k.startswith("encoders.")}


def matching_adapter_folder(folder: str, encoder_config, key: str = "init_encoders_from") -> Path:
    """The adapter folder of `folder`, checked to hold encoders of exactly `encoder_config` (JSON only: cheap,
    so train.py checks it before loading the base model)."""
    adapter = adapter_folder(folder, key)
    meta = read_moelora_folder(adapter, what=f"{key} adapter").meta
    if not isinstance(meta.get("encoders"), dict):
        raise ConfigError(key, f"{adapter} has no image/audio encoders (a text-only run?)")
    theirs, _ = saved_encoder_config(meta)
    theirs, ours = theirs.to_dict(), encoder_config.to_dict()
    diff = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ConfigError(key, f"{adapter}'s encoders do not match this run's encoders config ({'; '.join(diff)})")
    return adapter


def load_encoders_from(model, folder: str, key: str = "init_encoders_from") -> int:
    """Copy a saved run's encoders + projectors into `model.encoders`; returns the number of tensors copied."""
    adapter = matching_adapter_folder(folder, model.encoders.config, key)
    saved = saved_encoder_tensors(adapter, key)
    if (bad := first_non_finite(saved)) is not None:
        raise ConfigError(key, f"{adapter}: encoder tensor '{bad}' holds NaN or infinite values (a diverged run)")
    own = model.encoders.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in own.items():
            kind, child, rest = name.split(".", 2)
            source = name
            if source not in saved and child.startswith("proj") and child != "proj":
                source = f"{kind}.proj.{rest}"  # an extra projector the folder lacks starts as the main one
            if source not in saved:
                if child == "backbone":
                    continue  # frozen there: the pretrained model folder's weights (same folder, checked above)
                raise ConfigError(key, f"{adapter} has no encoder tensor '{name}' (saved by an older or other model?)")
            if saved[source].shape != tensor.shape:
                raise ConfigError(key, f"{adapter}: encoder tensor '{source}' has shape {list(saved[source].shape)}, "
                                  f"this model's '{name}' is {list(tensor.shape)}")
            tensor.copy_(saved[source].to(tensor.dtype))
            copied += 1
    return copied
