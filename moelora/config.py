"""Strict configuration dataclasses: unknown keys, wrong types and impossible values fail on construction.

Every config in moelora (each method's, the data section, the training run) subclasses `StrictConfig`.
`from_dict` is how YAML and JSON become configs: it rejects unknown keys with a "did you mean"
suggestion and checks every value against the field's annotation, so a typo never silently falls
back to a default. Errors are `ConfigError`s that name the full dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

from .errors import ConfigError, short_repr


def suggest(name: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(key: str, value: Any, tp) -> Any:
    """Return `value` checked (and where lossless, coerced) against annotation `tp`, else raise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(key, f"expected {' or '.join(_type_name(o) for o in options)}, got {short_repr(value)}")
    if origin is Literal:
        if value is False and "no" in get_args(tp):
            value = "no"  # YAML 1.1 reads a bare `no` (eval_strategy: no) as false
        if value not in get_args(tp):
            raise ConfigError(key, f"expected one of {', '.join(map(repr, get_args(tp)))}, got {short_repr(value)}"
                              f"{suggest(value if isinstance(value, str) else '', map(str, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {short_repr(value)}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {short_repr(value)}")
        kt, vt = get_args(tp) or (Any, Any)
        return {check_value(key, k, kt): check_value(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {short_repr(value)}")
        return value
    if isinstance(tp, type) and issubclass(tp, StrictConfig):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, prefix=key)
    return value


@dataclasses.dataclass
class StrictConfig:
    """Base for every config: validated on construction, built from dicts with `from_dict`."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(self._key(f.name), getattr(self, f.name), hints[f.name]))
        self.validate()

    # Dotted prefix for error messages, e.g. "method" so errors read "config key 'method.k'".
    _prefix: ClassVar[str] = ""
    # Keys added later whose default is not what a config saved before them did: {key: the old behaviour's value}.
    # A saved folder or checkpoint without the key is read with this value, and a resume must match it.
    _before_key: ClassVar[dict] = {}

    @classmethod
    def value_before_key(cls, f: dataclasses.Field):
        """What a config saved before field `f` existed meant by leaving it out."""
        if f.name in cls._before_key:
            return cls._before_key[f.name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def _key(self, name: str) -> str:
        prefix = getattr(self, "_instance_prefix", "") or self._prefix
        return f"{prefix}.{name}" if prefix else name

    def validate(self) -> None:
        """Cross-field checks; subclasses raise `self.error(key, message)`."""

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self._key(name), message)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {type(data).__name__}")
        names = cls.field_names()
        aliases = {a: f for a, f in getattr(cls, "aliases", {}).items() if f in names}
        if any(a in data for a in aliases):
            data = dict(data)
            for alias, field in aliases.items():
                if alias in data:
                    if field in data:
                        raise ConfigError(f"{prefix}.{alias}" if prefix else alias,
                                          f"is PEFT's name for '{field}'; give only one of them")
                    data[field] = data.pop(alias)
        for key in data:
            if key not in names:
                where = f"{prefix}.{key}" if prefix else key
                raise ConfigError(where, f"unknown key for {cls.__name__}{suggest(key, names)}")
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_instance_prefix", prefix)
        try:
            obj.__init__(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(prefix or cls.__name__, str(exc)) from None
        return obj

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, StrictConfig) else v
        return out


# Every linear projection of a Llama-style block: what SMoRA's released configs adapt ("lora_target: all").
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class MethodConfig(StrictConfig):
    """Fields every method shares. `method_name` is set by `register_method`."""

    method_name: ClassVar[str] = ""
    _prefix: ClassVar[str] = "method"

    # Module names to adapt, PEFT's rules (moelora/targets.py): list entries match a name or its dotted
    # suffix, "all-linear" every linear but the head, another string is a regex over full names.
    # None: the architecture's default (every projection of a block; see `default_targets`).
    target_modules: list[str] | str | None = None
    # What target_modules=None adapts: "all" projections of a block, or only the "attention" ones.
    default_targets: ClassVar[str] = "all"
    # PEFT's key names, accepted in dicts/YAML for the same fields (from_dict).
    aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    # Dropout on the adapter input (the router reads the same dropped-out input, as in the references).
    dropout: float = 0.0
    # PEFT's name and default: trainable adapter tensors live in fp32 under a bf16/fp16 base, so small AdamW
    # updates are not rounded away; false keeps them in the base dtype. Router buffers (SMoRA's beta, counts)
    # and routing arithmetic are fp32 either way.
    autocast_adapter_dtype: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise self.error("dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise self.error("target_modules", "is empty: name at least one module (e.g. q_proj)")

    def task_labels(self, tasks: list[str]) -> list[int] | None:
        """Per-sample routing labels for a batch's task names, for methods that route by label
        (LoRA-Mixer's stage 1); None for methods that route from the input alone."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.method_name, **super().to_dict()}
