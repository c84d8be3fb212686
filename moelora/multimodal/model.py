"""Image/audio encoders as a component that any method's model owns (DESIGN §4.5).

    model = get_moelora_model(base, MixLoRAConfig(), encoders=EncoderConfig())   # or model.attach_encoders(cfg)
    out = model(input_ids, attention_mask, media_mask=..., images=..., audio=..., labels=...)

`attach_encoders` puts a `MediaEncoders` module at `model.encoders` and one forward pre-hook on the model: before
the method's own forward runs (whatever it is: two passes for X-LoRA, a gate loss for MeteoRA), the hook turns
(input_ids, media_mask, images, audio) into `inputs_embeds` (token embeddings with every placeholder run
replaced by its item's projected features). `MoELoRAModel.generate` does the same before generating. A method
whose routing reads the modality defines `media_sample_labels(media_mask, sample_labels)` on its model and the
hook calls it (modality routing, `methods/modality.py`).

The batch comes from `moelora.data.media.MultimodalCollator`: `media_mask` [B, T] marks placeholder positions
(1 image, 2 audio); `images` [n, 3, H, W] and `audio` [n, n_mels, frames] hold the items in row order.
Encoders and projectors train with the adapters (freezing and learning rates per part: train.py); the LM stays
frozen. They are saved with the adapter (keys `encoders.*`, config under "encoders" in moelora_config.json) and
rebuilt on load; a pretrained HF encoder is saved as its folder path, plus its weights when it was trained.

`disable_adapter()` turns the encoders off too: inside it the model is exactly the base LM reading the token
ids (placeholders included), which is what "the base model" means in before/after tables.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, DataError, short_repr
from .encoders import MEDIA_KINDS, PARTS, EncoderConfig, WordProjector, build_encoder, part_of

_IMAGE, _AUDIO = 1, 2  # media_mask values (moelora.data.media)
MEDIA_KEYS = ("media_mask", "images", "audio")  # the forward/generate inputs the encoders consume


class MediaEncoders(nn.Module):
    """The image and audio paths of a multimodal model: `image` and `audio` encoders, each a feature extractor
    (part "encoders") plus projector(s) (part "projectors")."""

    def __init__(self, cfg: EncoderConfig, hidden: int, embed_std: float, pretrained_trained: dict | None = None):
        super().__init__()
        self.config = cfg
        self.image = build_encoder("image", cfg, hidden, embed_std)
        self.audio = build_encoder("audio", cfg, hidden, embed_std)
        self.enabled = True  # off inside disable_adapter(): the base LM reads the placeholder ids
        # Whether each pretrained backbone trains (then the checkpoint holds its weights) or stays as its
        # folder has it (then only the path is saved). Frozen unless told: keep what it learned.
        self.pretrained_trained = {kind: bool((pretrained_trained or {}).get(kind, False)) for kind in cfg.pretrained()}
        for kind, trained in self.pretrained_trained.items():
            getattr(self, kind).backbone.requires_grad_(trained)
            getattr(self, kind).backbone.train(trained and self.training)

    @property
    def media_tokens(self) -> dict[str, int]:
        """Placeholder tokens per image / audio clip (what the data side must put in the text)."""
        return self.config.media_tokens

    # --- parts: what freezing switches and per-part learning rates name --------------------------------
    def named_part_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """{"encoders": [(name, p)...], "projectors": [...]}, names relative to this module."""
        parts = {part: [] for part in PARTS}
        for kind in MEDIA_KINDS:
            for name, p in getattr(self, kind).named_parameters():
                parts[part_of(name)].append((f"{kind}.{name}", p))
        return parts

    def set_trainable(self, encoders: bool | None, projectors: bool) -> None:
        """Freeze or train each part. `encoders=None`: pretrained backbones frozen, ours trained (they start random)."""
        for kind in ("image", "audio"):
            pretrained = kind in self.pretrained_trained
            train = (not pretrained) if encoders is None else encoders
            if pretrained:
                self.pretrained_trained[kind] = train
                getattr(self, kind).backbone.train(train and self.training)
            for name, p in getattr(self, kind).named_parameters():
                p.requires_grad_(projectors if part_of(name) == "projectors" else train)

    def train(self, mode: bool = True):
        super().train(mode)
        for kind, trained in self.pretrained_trained.items():
            if not trained:  # a frozen pretrained backbone runs as at inference (no dropout): fixed features
                getattr(self, kind).backbone.eval()
        return self

    # --- what a checkpoint holds -----------------------------------------------------------------------
    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor but those of pretrained backbones that did not train (their folder has them)."""
        skip = tuple(f"{kind}.backbone." for kind, trained in self.pretrained_trained.items() if not trained)
        return {k: v for k, v in self.state_dict().items() if not (skip and k.startswith(skip))}

    def saved_config(self) -> dict:
        """moelora_config.json's entries: the encoder config, and for pretrained backbones their folder and
        whether the checkpoint holds their trained weights."""
        out = {"encoders": self.config.to_dict()}
        if self.pretrained_trained:
            out["pretrained_encoders"] = {kind: {"model": self.config.pretrained()[kind], "trained": trained}
                                          for kind, trained in self.pretrained_trained.items()}
        return out

    # --- inputs ------------------------------------------------------------------------------------------
    def blank_input(self, kind: str, device=None, dtype=None) -> torch.Tensor:
        """One all-zero item of the smallest size each encoder takes (8x8 pixels, 16 frames)."""
        shape = (1, self.config.image_channels, 8, 8) if kind == "image" else (1, self.config.n_mels, 16)
        return torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, emb: torch.Tensor, media_mask: torch.Tensor, images=None, audio=None,
                run_every_encoder: bool = False) -> torch.Tensor:
        """`emb` (token embeddings [B, T, d]) with every placeholder run replaced by its item's encoded tokens."""
        media_mask = media_mask.to(emb.device)
        audio_args = {}
        if audio is not None and getattr(self.audio, "projects_with_image", False):
            # An audio encoder that projects image+audio samples' audio apart (Phi-4's vision-speech projector)
            # is told which clips share their row with an image. Items come in row order: each row's audio
            # positions / tokens per clip; no host read. An argument, not module state: a compiled graph
            # would guard on (and re-trace for) an attribute set per call.
            per_row = (media_mask == _AUDIO).sum(1) // self.media_tokens["audio"]
            audio_args["with_image"] = torch.repeat_interleave((media_mask == _IMAGE).any(1), per_row,
                                                               output_size=audio.shape[0])
        for kind, items, encoder in ((_IMAGE, images, self.image), (_AUDIO, audio, self.audio)):
            where = media_mask == kind
            n_items = 0 if items is None else items.shape[0]
            dtype = next(encoder.parameters()).dtype
            if n_items:
                feats = encoder(items.to(device=emb.device, dtype=dtype), **(audio_args if kind == _AUDIO else {}))
                emb = emb.masked_scatter(where.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype))
            elif run_every_encoder:
                blank = self.blank_input("image" if kind == _IMAGE else "audio", device=emb.device, dtype=dtype)
                emb = emb + 0.0 * encoder(blank).sum().to(emb.dtype)  # in the graph, changes nothing
        return emb

    def check_media(self, media_mask, n_items: dict[str, int]) -> None:
        """Every placeholder run has its item and every item its run: else encoded tokens would land on
        text (or items be dropped) silently. One host read for both modalities."""
        if media_mask is None:
            slots = [0, 0]
        else:
            slots = torch.stack([(media_mask == _IMAGE).sum(), (media_mask == _AUDIO).sum()]).tolist()
        for what, have in zip(("image", "audio"), slots):
            per_item = self.media_tokens[what]
            if have != n_items[what] * per_item:
                raise DataError(f"media_mask has {have} {what} positions but {n_items[what]} {what} item(s) x "
                                f"{per_item} tokens were given")

    def embed(self, model, input_ids, media_mask, images=None, audio=None) -> torch.Tensor:
        """Token embeddings of `model`'s LM with every placeholder run replaced by its item's encoded tokens."""
        return self(model.base_model.get_input_embeddings()(input_ids), media_mask, images, audio)

    def inputs_embeds(self, model, input_ids, media_mask, images, audio) -> torch.Tensor | None:
        """The LM's `inputs_embeds` for a batch, or None when it holds no media or the encoders are off."""
        if not self.enabled or input_ids is None:
            return None
        n_items = {what: 0 if items is None else items.shape[0] for what, items in (("image", images), ("audio", audio))}
        every = bool(getattr(model, "run_every_encoder", False)) and model.training
        if not torch.compiler.is_compiling():  # host reads; compiled training checks batches on the host (train.py)
            self.check_media(media_mask, n_items)
            model._check_token_ids(input_ids)  # before the embedding lookup, which would fail opaquely
        if every:  # even a text-only batch runs both encoders
            media_mask = torch.zeros_like(input_ids) if media_mask is None else media_mask
        elif media_mask is None or not any(n_items.values()):  # decided from shapes: no host read of the mask
            return None
        emb = model.base_model.get_input_embeddings()(input_ids)
        return self(emb, media_mask, images, audio, run_every_encoder=every)


def _routing_labels(model, media_mask, sample_labels):
    route = getattr(type(model), "media_sample_labels", None)  # a method that routes by modality
    if route is None or not model.encoders.enabled:
        return sample_labels
    return route(model, media_mask, sample_labels)


def _media_pre_hook(model, args, kwargs):
    """Forward pre-hook: (input_ids, media_mask, images, audio) -> inputs_embeds, before any method's forward."""
    media = {key: kwargs.pop(key, None) for key in MEDIA_KEYS}
    if "encoders" not in model._modules:
        return args, kwargs
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    labels = _routing_labels(model, media["media_mask"], kwargs.get("sample_labels"))
    if labels is not None or "sample_labels" in kwargs:
        kwargs["sample_labels"] = labels
    embeds = model.encoders.inputs_embeds(model, input_ids, media["media_mask"], media["images"], media["audio"])
    if embeds is not None:
        args = args[1:]
        kwargs.pop("input_ids", None)
        kwargs["inputs_embeds"] = embeds
    return args, kwargs


def generation_inputs(model, args: tuple, kwargs: dict, sample_labels):
    """(args, kwargs, sample_labels) for generate(): media consumed, `inputs_embeds` added beside the ids.
    With both, HF generation prefills from the embeddings and still returns the prompt ids followed by the
    new tokens, exactly as for text."""
    media = {key: kwargs.pop(key, None) for key in MEDIA_KEYS}
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    sample_labels = _routing_labels(model, media["media_mask"], sample_labels)
    embeds = model.encoders.inputs_embeds(model, input_ids, media["media_mask"], media["images"], media["audio"])
    if embeds is not None:
        kwargs["inputs_embeds"] = embeds
    return args, kwargs, sample_labels


def bind_words(encoders: nn.Module, embedding: nn.Module) -> None:
    """Point every words projector in `encoders` at the LM's input embedding (soft words are mixtures of its
    rows); a method that replaces an encoder after attach_encoders calls it again."""
    for module in encoders.modules():
        if isinstance(module, WordProjector):
            module.bind(embedding)


def attach_encoders(model, cfg: EncoderConfig, pretrained_trained: dict | None = None) -> MediaEncoders:
    """Give `model` (any method's `MoELoRAModel`) image/audio encoders; replaces encoders it had."""
    emb = model.base_model.get_input_embeddings()
    encoders = MediaEncoders(cfg, emb.embedding_dim, float(emb.weight.detach().float().std()), pretrained_trained)
    model.encoders = model.place_adapter(encoders, like=emb.weight)  # trainable: fp32 under a 16-bit LM, as adapters
    bind_words(encoders, emb)
    if "_media_hook" not in model.__dict__:
        model._media_hook = model.register_forward_pre_hook(_media_pre_hook, with_kwargs=True)
    # Sharded data parallel (ZeRO-3) gathers a module's weights on every process that runs it, in step: then
    # every encoder must run in every training step on every process, on a tiny blank input when the batch
    # lacks its modality (contributing exactly zero). train.py sets this with >1 process.
    model.__dict__.setdefault("run_every_encoder", False)
    return encoders


def attach_seeded_encoders(model, cfg: EncoderConfig, seed: int) -> MediaEncoders:
    """`model.attach_encoders(cfg)` drawn on an RNG stream of its own seeded by `seed`: every method's model of one
    seed starts identical encoders (from the run's stream they would depend on how much the adapter drew), and
    the run's later random draws are those of a model without them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.attach_encoders(cfg)


def saved_encoder_config(meta: dict) -> tuple[EncoderConfig, dict[str, bool]]:
    """(encoder config, {kind: trained}) of a moelora_config.json's "encoders" and "pretrained_encoders"."""
    # A checkpoint saved before `feature_norm` or `position_embedding` existed has the encoders without them.
    saved = meta["encoders"]
    cfg = EncoderConfig.from_dict({**EncoderConfig._before_key, **saved} if isinstance(saved, dict) else saved,
                                  prefix="encoders")
    pretrained = meta.get("pretrained_encoders") or {}
    if not isinstance(pretrained, dict) or not all(isinstance(v, dict) for v in pretrained.values()):
        raise CheckpointError(f"adapter config: 'pretrained_encoders' must map image/audio to {{model, trained}}, "
                              f"got {short_repr(pretrained)}")
    return cfg, {kind: bool(v.get("trained")) for kind, v in pretrained.items()}


MultimodalEncoders = MediaEncoders  # the name before encoders became a component
