"""The one reader of a moelora adapter folder's metadata: every place that opens a saved moelora adapter
(`MoELoRAModel.from_pretrained`, a method starting from an earlier checkpoint) reads it through here.

A moelora folder holds `moelora_config.json` ({"method", "moelora_version", "config": the method's fields,
plus what the model class adds, e.g. "encoders"}), the tensors (`adapter_model.safetensors`, or the files a
model class writes instead, read by its `read_adapter_files`) and `manifest.json` (base model, its
fingerprint, training provenance; optional). Reading validates the config as the method's config class does
and checks the fingerprint against the base the adapter is about to be put on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import check_fingerprint, read_json
from .errors import CheckpointError, short_repr
from .registry import config_from_dict

CONFIG_NAME = "moelora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class SavedAdapter:
    path: Path
    meta: dict  # moelora_config.json as saved
    config: object  # the method's config, built and validated from meta["config"]
    manifest: dict  # manifest.json ({} when the folder has none)

    @property
    def method(self) -> str:
        return self.config.method_name


def is_moelora_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_moelora_folder(path: str | Path, base_model=None, what: str = "adapter") -> SavedAdapter:
    """The config and manifest of a moelora folder; with `base_model`, refuses a folder trained on other base
    weights (its manifest's fingerprint). `what` names the folder's role in errors (e.g. "init_from adapter")."""
    path = Path(path)
    meta = read_json(path / CONFIG_NAME, f"{what} config")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{what} config {path / CONFIG_NAME}: 'config' must be a JSON object of the method's "
                              f"fields, got {short_repr(meta.get('config'))}")
    config = config_from_dict(dict(meta["config"]), prefix=f"{path / CONFIG_NAME}")
    manifest = read_json(path / MANIFEST_NAME, "manifest") if (path / MANIFEST_NAME).is_file() else {}
    if "base_fingerprint" in manifest:
        if not isinstance(manifest["base_fingerprint"], dict):
            raise CheckpointError(f"manifest {path / MANIFEST_NAME}: 'base_fingerprint' must be a JSON object, "
                                  f"got {short_repr(manifest['base_fingerprint'])}")
        if base_model is not None:
            check_fingerprint(manifest["base_fingerprint"], base_model, str(path))
    return SavedAdapter(path, meta, config, manifest)
