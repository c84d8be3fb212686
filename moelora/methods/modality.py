"""Modality routing, Phi-4-multimodal style (Microsoft, arXiv 2503.01743): one LoRA per modality.

A frozen LM gets one LoRA for vision and one for speech, plus image/audio encoders and projectors
(`moelora.multimodal`). The "router" is the input's modality, as in Phi-4 (DESIGN §4.5):

    text only       -> no adapter: exactly the base model
    image(s)        -> the vision LoRA
    audio only      -> the speech LoRA
    image + audio   -> the vision LoRA (Phi-4's VISION_SPEECH mode), and its audio through a projector of
                       its own (Phi-4's vision-speech audio projection; `vision_speech_projector`)

Each LoRA drops out its input at its own rate (`vision_dropout` 0, `speech_dropout` 0.01: Phi-4's configs).

Beyond Phi-4 (one mode per batch), the mode is chosen per *sample*, so one batch may mix text, image and
audio samples: every token of a sample uses its sample's LoRA, through `rank_activation` with k = 1 and
block index -1 ("no adapter") for text samples. Each modality keeps its own rank and alpha: both LoRAs
live in one bank of two blocks padded to the larger rank with zero rows (zero rows get zero gradients,
so they stay zero) and the per-modality scale alpha_m / r_m rides on the gate.

Saved as Phi-4's Hugging Face port ships its adapters: `vision-lora/` and `speech-lora/` PEFT LoRA
folders (each loads with `peft.PeftModel.from_pretrained` on the base LM), plus `encoders.safetensors`
and moelora's config/manifest, so `MoELoRAModel.from_pretrained` restores everything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_tensors, save_tensors, write_json
from ..config import MethodConfig
from ..errors import CheckpointError, DataError
from ..layer import AdapterLayer, kaiming_uniform_
from ..model import CONFIG_NAME
from ..model import MoELoRAModel
from ..multimodal.encoders import AudioEncoder, EncoderConfig, projector
from ..multimodal.model import bind_words
from ..ops import rank_activation
from ..peft_compat import PeftLoRA, model_lora_config, read_lora, read_lora_factors, write_lora_folder
from ..registry import register_method

MODALITIES = ("vision", "speech")  # block 0, block 1 of every layer's bank
ENCODERS_NAME = "encoders.safetensors"


@dataclasses.dataclass
class ModalityLoRAConfig(MethodConfig):
    vision_r: int = 16  # rank of the vision LoRA (Phi-4: 256 on a 3072-wide LM; 16 on SmolLM2's 576)
    vision_alpha: float = 32.0  # alpha/r = 2, as both of Phi-4's LoRAs
    speech_r: int = 16  # rank of the speech LoRA (Phi-4: 320)
    speech_alpha: float = 32.0  # alpha/r = 2, as Phi-4
    vision_dropout: float = 0.0  # input dropout of the vision LoRA: Phi-4's vision-lora config uses none
    speech_dropout: float = 0.01  # input dropout of the speech LoRA: Phi-4's speech-lora config
    # Image+audio samples project their audio with a projector of their own (Phi-4's "vision" audio projection
    # used in VISION_SPEECH mode); false: the speech projector for all audio.
    vision_speech_projector: bool = True

    def validate(self) -> None:
        super().validate()
        if self.dropout > 0:
            raise self.error("dropout", "modality routing drops out each LoRA's input at its own rate: set "
                             "vision_dropout / speech_dropout instead (Phi-4: 0 and 0.01)")
        for m in MODALITIES:
            if not 0.0 <= getattr(self, f"{m}_dropout") < 1.0:
                raise self.error(f"{m}_dropout", f"must be in [0, 1), got {getattr(self, f'{m}_dropout')}")
        for m in MODALITIES:
            if getattr(self, f"{m}_r") < 1:
                raise self.error(f"{m}_r", f"must be >= 1, got {getattr(self, f'{m}_r')}")
            if getattr(self, f"{m}_alpha") <= 0:
                raise self.error(f"{m}_alpha", f"must be > 0, got {getattr(self, f'{m}_alpha')}")

    def rank(self, modality: str) -> int:
        return getattr(self, f"{modality}_r")

    def scaling(self, modality: str) -> float:
        return getattr(self, f"{modality}_alpha") / self.rank(modality)


class ModalityLoRALayer(AdapterLayer):
    def __init__(self, base_layer, config: ModalityLoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        self.block = max(config.rank(m) for m in MODALITIES)
        bank = len(MODALITIES) * self.block
        self.lora_A = nn.Parameter(torch.zeros(bank, self.in_features, dtype=self.adapter_dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, bank, dtype=self.adapter_dtype, device=w.device))
        with torch.no_grad():
            for i, m in enumerate(MODALITIES):
                kaiming_uniform_(self.lora_A[i * self.block: i * self.block + config.rank(m)])
        self.register_buffer("scales", torch.tensor([config.scaling(m) for m in MODALITIES], dtype=torch.float32,
                                                    device=w.device), persistent=False)
        self.modality_p = [getattr(config, f"{m}_dropout") for m in MODALITIES]  # applied per token in `update`

    def update(self, x, out):
        modes = self.context.sample_labels  # [batch] modality block per sample, -1 = text (set by the model)
        if modes is None:
            return out  # an all-text batch: the base model, bit for bit
        idx = modes.to(x.device).repeat_interleave(x.shape[0] // modes.shape[0]).unsqueeze(1)  # [N, 1]
        gates = self.scales[idx.clamp(min=0)].to(x.dtype)  # alpha_m / r_m; the op zeroes idx -1 slots
        if self.training and any(p > 0 for p in self.modality_p):  # each token dropped at its modality's rate
            for m, p in enumerate(self.modality_p):
                if p > 0:
                    x = torch.where(idx == m, F.dropout(x, p, training=True), x)
        return rank_activation(x, self.lora_A, self.lora_B, idx, idx, gates, 1.0, block=self.block, out=out)

    def modality_weights(self, i: int, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_in], B [d_out, r]) of one modality's LoRA, without the padding."""
        lo, r = i * self.block, self.config.rank(modality)
        return self.lora_A[lo:lo + r], self.lora_B[:, lo:lo + r]


class VisionSpeechAudioEncoder(AudioEncoder):
    """The audio encoder with Phi-4's second projector: audio of an image+audio sample goes through
    `proj_vision_speech`, all other audio through `proj`. `with_image` ([n_items] bool) comes with each call
    from `MediaEncoders`. Both projectors always run (a `where`, no host read), so every parameter is in every
    graph."""

    projects_with_image = True  # MediaEncoders passes `with_image`

    def __init__(self, cfg, hidden: int, embed_std: float):
        super().__init__(cfg, hidden, embed_std)
        self.proj_vision_speech = projector(cfg, cfg.audio_tokens, cfg.audio_width, hidden, embed_std)

    def forward(self, mels: torch.Tensor, with_image: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(mels)
        flags = with_image
        if flags is None or flags.shape[0] != mels.shape[0]:  # a blank input (every encoder runs): speech
            flags = torch.zeros(mels.shape[0], dtype=torch.bool, device=mels.device)
        return torch.where(flags.view(-1, 1, 1), self.proj_vision_speech(feats), self.proj(feats))


class ModalityLoRAModel(MoELoRAModel):
    """Multimodal model whose adapter is chosen by each sample's modality (it always owns encoders)."""

    def __init__(self, base_model, method_config, base_model_id=None, encoder_config=None):
        super().__init__(base_model, method_config, base_model_id)
        self.attach_encoders(encoder_config or EncoderConfig())

    def attach_encoders(self, config, pretrained_trained=None):
        encoders = super().attach_encoders(config, pretrained_trained)
        if self.method_config.vision_speech_projector and config.audio_model is None:
            old = encoders.audio
            emb = self.base_model.get_input_embeddings()
            new = VisionSpeechAudioEncoder(config, emb.embedding_dim, float(emb.weight.detach().float().std()))
            new.load_state_dict(old.state_dict(), strict=False)  # the same conv and speech projector
            ref = next(old.parameters())
            encoders.audio = new.to(device=ref.device, dtype=ref.dtype)
            bind_words(encoders, emb)  # the new encoder's projectors, words ones included, read this LM
        return encoders

    @staticmethod
    def modes(media_mask: torch.Tensor) -> torch.Tensor:
        """[batch] block per sample: 0 vision (any image, with or without audio), 1 speech, -1 text."""
        has_image = (media_mask == 1).any(1)
        has_audio = (media_mask == 2).any(1)
        none = torch.full_like(has_image, -1, dtype=torch.long)
        speech = torch.where(has_audio, MODALITIES.index("speech"), none)
        return torch.where(has_image, MODALITIES.index("vision"), speech)  # where, not masked writes: no host sync

    def media_sample_labels(self, media_mask, sample_labels):
        """The routing labels: each sample's modality (called by the encoders' input hook, forward and generate)."""
        if sample_labels is not None or media_mask is None:
            return sample_labels
        modes = self.modes(media_mask)
        # None: no sample takes an adapter, so layers skip the op. While training, an all-text micro-batch
        # still runs it (adding exact zeros) so that its loss has a graph to backpropagate through.
        return modes if self.training or bool((modes >= 0).any()) else None

    # --- files: one PEFT LoRA folder per modality + the encoders ---------------------------------------
    def _peft_config(self, modality: str) -> dict:
        cfg = self.method_config
        return model_lora_config(self, cfg.rank(modality), getattr(cfg, f"{modality}_alpha"),
                                 getattr(cfg, f"{modality}_dropout"))

    @staticmethod
    def _read_lora(folder) -> PeftLoRA:
        """A modality's PEFT folder config: the format's checks (no DoRA, alpha/rank patterns, ...), and alpha / r
        scaling only (each modality's scale is alpha_m / r_m)."""
        lora = read_lora(folder)
        if lora.use_rslora:
            raise CheckpointError(f"{folder}/adapter_config.json: 'use_rslora': true is not supported by modality "
                                  "routing (each LoRA is scaled alpha / r)")
        return lora

    def write_adapter_files(self, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        write_json(folder / CONFIG_NAME, self.saved_config())
        save_tensors(folder / ENCODERS_NAME, {k[len("encoders."):]: v for k, v in tensors.items()
                                              if k.startswith("encoders.")}, metadata={"format": "moelora"})
        for i, modality in enumerate(MODALITIES):
            r = self.method_config.rank(modality)
            factors = {name: (tensors[f"{name}.lora_A"][i * layer.block:i * layer.block + r],
                              tensors[f"{name}.lora_B"][:, i * layer.block:i * layer.block + r])
                       for name, layer in self.adapter_layers().items()}
            write_lora_folder(folder / f"{modality}-lora", self._peft_config(modality), factors)

    def read_adapter_files(self, folder: Path) -> tuple[dict[str, torch.Tensor], str]:
        folder = Path(folder)
        tensors = {f"encoders.{k}": v for k, v in load_tensors(folder / ENCODERS_NAME).items()}
        if self.method_config.vision_speech_projector and not any(".proj_vision_speech." in k for k in tensors):
            # Saved before the vision-speech projector existed: it projected image+audio samples' audio with the
            # speech projector, so a copy of that one keeps the checkpoint's outputs exactly as they were.
            tensors.update({k.replace("encoders.audio.proj.", "encoders.audio.proj_vision_speech."): v
                            for k, v in list(tensors.items()) if k.startswith("encoders.audio.proj.")})
        for i, modality in enumerate(MODALITIES):
            sub = folder / f"{modality}-lora"
            lora = self._read_lora(sub)
            want = (self.method_config.rank(modality), float(getattr(self.method_config, f"{modality}_alpha")))
            got = (lora.r, lora.alpha)
            if got != want:
                raise CheckpointError(f"{sub}/adapter_config.json: r/lora_alpha {got} differ from {folder / CONFIG_NAME}'s "
                                      f"{modality}_r/{modality}_alpha {want}")
            self._fill_from_peft(tensors, i, modality, sub)
        return tensors, str(folder)

    def _fill_from_peft(self, tensors: dict, i: int, modality: str, sub: Path) -> None:
        """Copy one modality's PEFT LoRA tensors into block i of every layer's (zero-padded) bank."""
        own = self.adapter_state_dict()
        factors = read_lora_factors(sub, who=f"{modality} LoRA {sub}")
        r = self.method_config.rank(modality)
        for name, layer in self.adapter_layers().items():
            if name not in factors:
                raise CheckpointError(f"{sub}/adapter_model.safetensors has no LoRA for '{name}' "
                                      "(different target_modules?)")
            lo = i * layer.block
            for leaf, value in zip(("lora_A", "lora_B"), factors[name]):
                full = tensors.setdefault(f"{name}.{leaf}", torch.zeros_like(own[f"{name}.{leaf}"]))
                part = full[lo:lo + r] if leaf == "lora_A" else full[:, lo:lo + r]
                if part.shape != value.shape:
                    raise CheckpointError(f"{sub}/adapter_model.safetensors: '{name}.{leaf}' has shape "
                                          f"{list(value.shape)}, expected {list(part.shape)}")
                part.copy_(value)

    @classmethod
    def from_peft_folders(cls, base_model, folders: dict, encoder_config=None, base_model_id=None) -> "ModalityLoRAModel":
        """Both LoRAs from PEFT LoRA folders ({"vision": dir, "speech": dir}, e.g. Phi-4's vision-lora/ and
        speech-lora/), each with its own rank and alpha; the encoders start fresh."""
        if set(folders) != set(MODALITIES):
            raise CheckpointError(f"from_peft_folders needs one folder per modality {list(MODALITIES)}, got {sorted(folders)}")
        loras = {m: cls._read_lora(folders[m]) for m in MODALITIES}
        targets = [lora.target_modules for lora in loras.values()]
        if targets[0] != targets[1]:
            raise CheckpointError(f"the vision and speech folders adapt different modules: {targets[0]} vs {targets[1]}")
        fields = {f: v for m, c in loras.items() for f, v in ((f"{m}_r", c.r), (f"{m}_alpha", c.alpha), (f"{m}_dropout", c.dropout))}
        config = ModalityLoRAConfig(target_modules=targets[0], **fields)
        model = cls(base_model, config, base_model_id or loras["vision"].base_model,
                    encoder_config=encoder_config)
        tensors = dict(model.adapter_state_dict())
        for key in [k for k in tensors if not k.startswith("encoders.")]:
            tensors.pop(key)  # rebuilt from the folders (padding rows zero)
        for i, m in enumerate(MODALITIES):
            model._fill_from_peft(tensors, i, m, Path(folders[m]))
        model.load_adapter_state_dict(tensors, where=", ".join(str(folders[m]) for m in MODALITIES))
        return model

register_method("modality", ModalityLoRAConfig, ModalityLoRALayer, model_cls=ModalityLoRAModel)
