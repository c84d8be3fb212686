"""Multimodal models: encoders + projectors whose outputs replace placeholder tokens (DESIGN §4.5)."""

from .encoders import EncoderConfig, MultimodalEncoders
from .model import MultimodalLoRAModel, multimodal_model_class

__all__ = ["EncoderConfig", "MultimodalEncoders", "MultimodalLoRAModel", "multimodal_model_class"]
