"""`MultimodalLoRAModel`: any method's adapters plus image/audio encoders feeding a frozen LM.

    model = get_moelora_model(base, MixLoRAConfig(), encoders=EncoderConfig())
    out = model(input_ids, attention_mask, media_mask=..., images=..., audio=..., labels=...)

The batch comes from `moelora.data.media.MultimodalCollator`: `media_mask` [B, T] marks placeholder
positions (1 image, 2 audio); `images` [n, 3, H, W] and `audio` [n, n_mels, frames] hold the items in
row order. The encoders' tokens overwrite the placeholders' embeddings and the LM runs on `inputs_embeds`.
Encoders and projectors are trained with the adapters; the LM stays frozen. They are saved with the
adapter (keys `encoders.*`, config under "encoders" in moelora_config.json) and rebuilt on load.

`disable_adapter()` turns the encoders off too: inside it the model is exactly the base LM reading the
token ids (placeholders included), which is what "the base model" means in before/after tables.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import DataError, MoeloraError
from ..model import MoELoRAModel
from .encoders import EncoderConfig, MultimodalEncoders

_IMAGE, _AUDIO = 1, 2  # media_mask values (moelora.data.media)


class MultimodalLoRAModel(MoELoRAModel):
    def __init__(self, base_model, method_config, base_model_id=None, encoder_config: EncoderConfig | None = None):
        super().__init__(base_model, method_config, base_model_id)
        self.encoder_config = encoder_config or EncoderConfig()
        emb = base_model.get_input_embeddings()
        self.encoders = MultimodalEncoders(self.encoder_config, emb.embedding_dim, float(emb.weight.detach().float().std()))
        self.place_adapter(self.encoders, like=emb.weight)  # trainable: fp32 under a 16-bit LM, as the adapters
        self.media_enabled = True
        # Sharded data parallel (ZeRO-3) gathers a module's weights on every process that runs it, in step:
        # then every encoder must run in every training step on every process, on a tiny blank input when
        # the batch lacks its modality (contributing exactly zero). train.py sets this with >1 process.
        self.run_every_encoder = False

    @property
    def media_tokens(self) -> dict[str, int]:
        """Placeholder tokens per image / audio clip (what the data side must put in the text)."""
        return self.encoder_config.media_tokens

    # --- inputs ---------------------------------------------------------------------------------
    def embed(self, input_ids, media_mask, images=None, audio=None) -> torch.Tensor:
        """Token embeddings with every placeholder run replaced by its item's encoded tokens."""
        emb = self.base_model.get_input_embeddings()(input_ids)
        media_mask = media_mask.to(emb.device)
        for kind, items, encoder, what in ((_IMAGE, images, self.encoders.image, "image"),
                                           (_AUDIO, audio, self.encoders.audio, "audio")):
            where = media_mask == kind
            n_items = 0 if items is None else items.shape[0]
            dtype = next(encoder.parameters()).dtype
            if n_items:
                feats = encoder(items.to(device=emb.device, dtype=dtype))
                emb = emb.masked_scatter(where.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype))
            elif self.run_every_encoder and self.training:
                blank = self.encoders.blank_input(what, device=emb.device, dtype=dtype)
                emb = emb + 0.0 * encoder(blank).sum().to(emb.dtype)  # in the graph, changes nothing
        return emb

    def _media_inputs(self, input_ids, media_mask, images, audio) -> dict:
        """{"inputs_embeds": ...} when the batch holds media and the encoders are on, else {}."""
        if not self.media_enabled or input_ids is None:
            return {}
        n_items = {what: 0 if items is None else items.shape[0] for what, items in (("image", images), ("audio", audio))}
        if not torch.compiler.is_compiling():  # a host read; compiled training checks batches on the host (train.py)
            self.check_media(media_mask, n_items)
        if self.run_every_encoder and self.training:  # even a text-only batch runs both encoders
            media_mask = torch.zeros_like(input_ids) if media_mask is None else media_mask
        elif media_mask is None or not any(n_items.values()):  # decided from shapes: no host read of the mask
            return {}
        return {"inputs_embeds": self.embed(input_ids, media_mask, images, audio)}

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

    def forward(self, input_ids=None, attention_mask=None, media_mask=None, images=None, audio=None,
                sample_labels=None, **kwargs):
        media = self._media_inputs(input_ids, media_mask, images, audio)
        if media:
            return super().forward(attention_mask=attention_mask, sample_labels=sample_labels, **media, **kwargs)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, sample_labels=sample_labels, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, media_mask=None, images=None, audio=None,
                 sample_labels=None, **kwargs):
        # With both ids and embeddings, HF generation prefills from the embeddings and still returns the
        # prompt ids followed by the new tokens, exactly as for text.
        media = self._media_inputs(input_ids, media_mask, images, audio)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, sample_labels=sample_labels,
                                **media, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self):
        """The plain base LM: adapters off and encoders off (placeholders stay token ids)."""
        with super().disable_adapter():
            self.media_enabled = False
            try:
                yield self
            finally:
                self.media_enabled = True

    # --- state: adapters + encoders -------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict()
        out.update({f"encoders.{k}": v for k, v in self.encoders.state_dict().items()})
        return out

    def saved_config(self) -> dict:
        return {**super().saved_config(), "encoders": self.encoder_config.to_dict()}


def multimodal_model_class(model_cls: type) -> type:
    """The multimodal variant of a method's model class (itself when it is multimodal already)."""
    if issubclass(model_cls, MultimodalLoRAModel):
        return model_cls
    if model_cls is MoELoRAModel:
        return MultimodalLoRAModel
    raise MoeloraError(f"{model_cls.__name__} has its own forward pass and no multimodal variant; "
                       "train it on text (data.suite: text)")
