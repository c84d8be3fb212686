"""Pretrained Hugging Face encoders behind our projectors (`encoders.image_model` / `encoders.audio_model`).

Any local folder that `transformers.AutoModel` loads offline, from safetensors, without remote code:

    vision: CLIP/SigLIP (the whole model or its vision tower)   -> last hidden state's patch tokens
            -> avg-pooled to image_grid x image_grid tokens -> our projector
    audio:  Whisper-style encoders (WhisperModel or its encoder) -> last hidden state over the clip's frames
            -> avg-pooled to audio_tokens tokens -> our projector

Inputs are converted to what the model expects. Images ([n, C, H, W] in [0, 1]) are resized (bilinear) to the
model's `image_size` and normalised with the folder's preprocessor_config.json `image_mean`/`image_std`
(CLIP's values when the folder has none). Audio: the data pipeline makes 40-band log-mel features at
22.05 kHz / hop 256 (`moelora.data.audio`), Whisper 80 or 128 bands at 16 kHz / hop 160, padded to 30 s. The
features are resampled, bilinearly, to the model's `num_mel_bins` and frame rate (the folder's
preprocessor_config.json sampling_rate/hop_length, else Whisper's), then padded with the clip's floor (its
silence) to the model's input length. That is an approximation of the model's own filterbank, not its
features: a pretrained Whisper sees mel bands that are close but not its own, so expect it to need training
(or compute features with its feature extractor from the waveform, which the suite does not keep).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, short_repr
from .encoders import EncoderConfig, projector

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHISPER_RATE, WHISPER_HOP = 16000, 160  # Whisper's feature extractor: 100 frames per second
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_hf_model(path: str, key: str) -> nn.Module:
    """A local HF model folder through AutoModel: offline, safetensors only, never remote code."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(key, f"folder not found: {path} (a local Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ConfigError(key, f"{path} is not a Hugging Face model folder: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle files {pickles}, which moelora never loads" if pickles else "no weights"
        raise ConfigError(key, f"{path} holds no .safetensors weights ({found}); save the model with "
                          "save_pretrained(..., safe_serialization=True)")
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                          trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(key, f"{path} does not load with transformers.AutoModel (offline, safetensors, no "
                          f"remote code): {short_repr(first)}") from None
    return model.eval()


def _preprocessor(path: str) -> dict:
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("encoders", f"{file} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _side(value) -> int:
    """image_size / patch_size as one int (configs may give [h, w] for square inputs)."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class PretrainedImageEncoder(nn.Module):
    """A HF vision model's patch features, pooled to image_grid² tokens, through our projector."""

    def __init__(self, cfg: EncoderConfig, hidden: int, embed_std: float):
        super().__init__()
        self.cfg = cfg
        model = load_hf_model(cfg.image_model, "encoders.image_model")
        vision = getattr(model.config, "vision_config", None) or model.config
        missing = [k for k in ("image_size", "patch_size", "hidden_size") if getattr(vision, k, None) is None]
        if missing:
            raise ConfigError("encoders.image_model", f"{cfg.image_model} is not a vision model: its config has no "
                              f"{', '.join(missing)}")
        self.size, patch = _side(vision.image_size), _side(vision.patch_size)
        self.side = self.size // patch  # patches per image side
        channels = getattr(vision, "num_channels", 3)
        if channels != cfg.image_channels:
            raise ConfigError("encoders.image_channels", f"{cfg.image_channels}, but {cfg.image_model} takes "
                              f"{channels}-channel images")
        self.backbone = getattr(model, "vision_model", model)  # CLIPModel/SiglipModel: the vision tower only
        self.width = vision.hidden_size
        pre = _preprocessor(cfg.image_model)
        mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.proj = projector(cfg, cfg.image_grid ** 2, self.width, hidden, embed_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] in [0, 1] -> [n, grid², hidden]."""
        if images.dim() != 4 or images.shape[1] != self.cfg.image_channels:
            raise DataError(f"images must be [n, {self.cfg.image_channels}, H, W], got {list(images.shape)}")
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        h = self.backbone(pixel_values=x).last_hidden_state  # [n, (cls +) patches, width]
        patches = self.side * self.side
        if h.shape[1] < patches:
            raise DataError(f"{self.cfg.image_model} returned {h.shape[1]} tokens for {patches} patches")
        grid = h[:, -patches:].transpose(1, 2).reshape(h.shape[0], self.width, self.side, self.side)
        return self.proj(F.adaptive_avg_pool2d(grid, self.cfg.image_grid).flatten(2).transpose(1, 2))


class PretrainedAudioEncoder(nn.Module):
    """A Whisper-style HF encoder's frames over the clip, pooled to audio_tokens tokens, through our projector."""

    def __init__(self, cfg: EncoderConfig, hidden: int, embed_std: float):
        super().__init__()
        from ..data.audio import HOP, SAMPLE_RATE

        self.cfg = cfg
        model = load_hf_model(cfg.audio_model, "encoders.audio_model")
        mc = model.config
        missing = [k for k in ("num_mel_bins", "max_source_positions") if getattr(mc, k, None) is None]
        if missing:
            raise ConfigError("encoders.audio_model", f"{cfg.audio_model} is not a Whisper-style audio encoder: its "
                              f"config has no {', '.join(missing)}")
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        self.backbone = getattr(model, "encoder", encoder)  # WhisperModel: the encoder only (no decoder kept)
        pre = _preprocessor(cfg.audio_model)
        self.bins = int(mc.num_mel_bins)
        self.frames = int(pre.get("nb_max_frames") or 2 * mc.max_source_positions)  # the input length it takes
        rate = pre.get("sampling_rate", WHISPER_RATE) / pre.get("hop_length", WHISPER_HOP)
        self.stretch = rate / (SAMPLE_RATE / HOP)  # model frames per data frame
        self.width = int(getattr(mc, "d_model", None) or mc.hidden_size)
        self.proj = projector(cfg, cfg.audio_tokens, self.width, hidden, embed_std)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """[n, n_mels, frames] log-mel -> [n, audio_tokens, hidden]."""
        if mels.dim() != 3 or mels.shape[1] != self.cfg.n_mels:
            raise DataError(f"audio features must be [n, {self.cfg.n_mels}, frames], got {list(mels.shape)}")
        frames = min(self.frames, max(1, round(mels.shape[2] * self.stretch)))
        x = F.interpolate(mels.unsqueeze(1), size=(self.bins, frames), mode="bilinear", align_corners=False).squeeze(1)
        floor = x.amin(dim=(1, 2), keepdim=True)  # the clip's silence level pads it to the model's length
        x = torch.cat([x, floor.expand(-1, self.bins, self.frames - frames)], dim=2)
        h = self.backbone(input_features=x).last_hidden_state  # [n, positions, width]
        valid = max(1, min(h.shape[1], math.ceil(frames * h.shape[1] / self.frames)))  # the frames the clip covers
        pooled = F.adaptive_avg_pool1d(h[:, :valid].transpose(1, 2), self.cfg.audio_tokens)
        return self.proj(pooled.transpose(1, 2))
