"""Multimodal models: encoders + projectors whose outputs replace placeholder tokens (DESIGN §4.5)."""

from .encoders import EncoderConfig
from .model import MediaEncoders, MultimodalEncoders, attach_encoders

__all__ = ["EncoderConfig", "MediaEncoders", "MultimodalEncoders", "attach_encoders"]
