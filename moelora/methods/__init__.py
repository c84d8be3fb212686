"""One module per method; importing this package registers them all (see `moelora.registry`)."""

from . import lora, smora  # noqa: F401
from .lora import LoRAConfig, LoRALayer
from .smora import SMoRAConfig, SMoRALayer

__all__ = ["LoRAConfig", "LoRALayer", "SMoRAConfig", "SMoRALayer"]
