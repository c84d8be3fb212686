"""The method registry: one `register_method` line per method module.

Adding a method is one module in `moelora/methods/` (config + layer), one `register_method` call at its
end (the package imports every module in it, so nothing else is edited), one YAML in `configs/`, and one row
in the method list every test reads (`tests/method_cases.py`, run by `tests/test_method_matrix.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import suggest
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    layer_cls: type
    model_cls: type | None = None  # a MoELoRAModel subclass when the method needs model-level passes (X-LoRA)


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, layer_cls: type, model_cls: type | None = None) -> None:
    if name in METHODS:
        raise ValueError(f"method '{name}' is registered twice")
    if name != name.lower():
        raise ValueError(f"method names are lower case: '{name}'")
    config_cls.method_name = name
    layer_cls.method = name
    METHODS[name] = Method(name, config_cls, layer_cls, model_cls)


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
