"""The method registry: one `register_method` line per method module.

Adding a method is one module in `moelora/methods/` (config + layer), one `register_method` call at its
end (the package imports every module in it, so nothing else is edited), one YAML in `configs/`, and one row
in the method list every test reads (`tests/method_cases.py`, run by `tests/test_method_matrix.py`).
PEFT folders: a method registers what it writes for `save_pretrained(format="peft")` (`peft_exporter=`) and
what PEFT folder types load as it (`register_peft_importer`), so the model and the format (`peft_compat`)
never name a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import suggest
from .errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    layer_cls: type
    model_cls: type | None = None  # a MoELoRAModel subclass when the method needs model-level passes (X-LoRA)
    # (model, tensors, folder) -> None: writes `save_pretrained(format="peft")` (None: no PEFT equivalent)
    peft_exporter: Callable | None = None


METHODS: dict[str, Method] = {}
# PEFT peft_type -> (model_cls, base_model, folder, base_model_id) -> a model: what a PEFT folder loads as
PEFT_IMPORTERS: dict[str, Callable] = {}


def register_method(name: str, config_cls: type, layer_cls: type, model_cls: type | None = None,
                    peft_exporter: Callable | None = None) -> None:
    if name in METHODS:
        raise ValueError(f"method '{name}' is registered twice")
    if name != name.lower():
        raise ValueError(f"method names are lower case: '{name}'")
    config_cls.method_name = name
    layer_cls.method = name
    METHODS[name] = Method(name, config_cls, layer_cls, model_cls, peft_exporter)


def register_peft_importer(peft_type: str, importer: Callable) -> None:
    """`MoELoRAModel.from_pretrained` loads PEFT folders of `peft_type` with `importer` (a method registers it)."""
    if peft_type in PEFT_IMPORTERS:
        raise ValueError(f"PEFT type '{peft_type}' has two importers")
    PEFT_IMPORTERS[peft_type] = importer


def get_peft_importer(peft_type, where: str) -> Callable:
    from . import methods  # noqa: F401  (importing the package registers every importer)

    if peft_type not in PEFT_IMPORTERS:
        raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported here (moelora imports PEFT "
                              f"{', '.join(repr(t) for t in sorted(PEFT_IMPORTERS))} folders)")
    return PEFT_IMPORTERS[peft_type]


def peft_exporter(name: str) -> Callable:
    """The method's `format="peft"` writer, or a CheckpointError naming the methods that have one."""
    method = get_method(name)
    if method.peft_exporter is None:
        have = sorted(m.name for m in METHODS.values() if m.peft_exporter is not None)
        raise CheckpointError(f"format='peft': method '{name}' has no PEFT equivalent (PEFT folders are written "
                              f"for {', '.join(have)}); save it with the default format")
    return method.peft_exporter


def get_method(name: str, key: str = "method.name") -> Method:
    from . import methods  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise ConfigError(key, f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}{suggest(name, METHODS)}")
    return METHODS[name]


def config_from_dict(data: dict, prefix: str = "method"):
    """Build a method config from `{"name": ..., **fields}` (the `method:` section of a run config)."""
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"{prefix}.name", "missing: say which method to train (e.g. name: smora)")
    fields = dict(data)
    method = get_method(fields.pop("name"), key=f"{prefix}.name")
    return method.config_cls.from_dict(fields, prefix=prefix)
