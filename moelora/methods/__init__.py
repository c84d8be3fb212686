"""One module per method; importing this package imports every module in it, which registers them all.

Adding a method is one new module here (its config, layer and `register_method` call): nothing else is edited.
The package exports each module's public names (its `__all__`, else the classes it defines whose names end
in Config, Layer or Model), so `from moelora.methods import SMoRAConfig` and `moelora.SMoRAConfig` work
for every method, including new ones.
"""

import importlib
import pkgutil

__all__: list[str] = []


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__
            and not n.startswith("_") and n.endswith(("Config", "Layer", "Model"))]


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # a fixed order: registry order
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in _public_names(_module):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
