"""One module per method; importing this package registers them all (see `moelora.registry`)."""

from . import lora, lora_mixer, mixlora, modality, smora, xlora  # noqa: F401
from .lora import LoRAConfig, LoRALayer
from .lora_mixer import LoRAMixerConfig, LoRAMixerLayer, LoRAMixerModel
from .mixlora import MixLoRAConfig, MixLoRALayer
from .modality import ModalityLoRAConfig, ModalityLoRALayer, ModalityLoRAModel
from .smora import SMoRAConfig, SMoRALayer
from .xlora import XLoRAConfig, XLoRALayer, XLoRAModel

__all__ = ["LoRAConfig", "LoRALayer", "LoRAMixerConfig", "LoRAMixerLayer", "LoRAMixerModel", "MixLoRAConfig",
           "MixLoRALayer", "ModalityLoRAConfig", "ModalityLoRALayer", "ModalityLoRAModel",
           "SMoRAConfig", "SMoRALayer", "XLoRAConfig", "XLoRALayer", "XLoRAModel"]
