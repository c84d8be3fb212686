"""Small image and audio encoders with projectors into the LM's embedding space (DESIGN §4.5).

Ours are trained from scratch (the LM stays frozen), so they are small and fast on a CPU:

    image [3, H, W]   -> conv 3x3, conv 3x3 stride 2, conv 3x3 -> avg-pool to grid x grid -> grid² tokens
    log-mel [M, F]    -> 3 x conv1d (k 5, stride 2)            -> avg-pool to audio_tokens    -> audio_tokens tokens
    + position        -> a learned vector per token slot (zero at the start), as ViT's position embeddings
    projector         -> Linear(width -> d) . GELU . Linear(d -> d)       (Phi-4's projector shape)
                         [. every token rescaled to the embeddings' RMS, with token_norm]
                      or, with `projector: words`, soft words: all tokens' features -> one MLP -> per token a
                         softmax over the LM's vocabulary, through its tied embedding -> a mixture of token embeddings

With `feature_norm` (the default) pictures are centred to [-1, 1] (SigLIP's normalisation), the conv layers are
initialised to keep their input's variance (He init, zero biases) and a LayerNorm closes the feature extractor;
the projector's first layer then sees unit-variance features and its last layer starts at the scale of the LM's
token embeddings. Both matter: without them (the encoders of checkpoints saved before `feature_norm`) a fresh
encoder's tokens were 28x smaller than the embeddings and 98% of their value was the same for every picture
(the biases), so the frozen LM saw one constant token and the image path did not learn in 400 steps
(RESULTS.md §8). Every token of an encoded item replaces one
placeholder token of the sequence (see `moelora.data.media`).

Instead of our conv feature extractor, a local Hugging Face vision or audio model can sit behind the projector
(`image_model` / `audio_model`: `moelora.multimodal.pretrained`). Each encoder has two parts that train,
freeze and take learning rates separately (`part_of`): the feature extractor ("encoders": `conv` or a pretrained
`backbone`) and its projector(s) ("projectors": every child named `proj*`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from ..config import StrictConfig
from ..errors import ConfigError, DataError


@dataclasses.dataclass
class EncoderConfig(StrictConfig):
    _prefix = "encoders"
    # what a checkpoint saved before each key had: neither norm nor positions, words written by the MLP
    _before_key = {"feature_norm": False, "position_embedding": False, "word_writer": "mlp"}

    image_channels: int = 3  # RGB; the suite's digit scans are grey repeated over 3 channels
    image_grid: int = 2  # an image becomes grid x grid tokens: 4 regions of the 16x16 pictures
    image_width: int = 64  # conv channels: enough for digits, shapes and colours
    n_mels: int = 40  # mel bands of the audio features (moelora.data.audio.N_MELS)
    audio_tokens: int = 8  # tokens per clip: ~0.23 s each for the suite's 1.86 s windows (Phi-4: 80 ms)
    audio_width: int = 64  # conv channels of the audio encoder
    # Centred pictures, variance-keeping conv init and a LayerNorm on the features, so encoded tokens differ
    # between inputs from the first step (RESULTS.md §8); false: the encoders of checkpoints saved before it.
    feature_norm: bool = True
    # A learned embedding of each token's place (grid cell / time slot) added to its features, as ViT and CLIP add
    # theirs: conv features are local and the same wherever a stroke is, and the LM's attention sums values that
    # carry no position (RoPE rotates queries and keys only), so without it the layout of a digit's strokes is lost.
    # Zero-initialised: a fresh encoder's tokens are those without it. Our conv encoders only (a pretrained ViT or
    # Whisper has its own). false: checkpoints saved before it.
    position_embedding: bool = True
    # Every projected token rescaled to the token embeddings' RMS (a parameter-free RMS norm at the projector's
    # end). Trained without it the tokens grow to 20-60x the embeddings' scale (RESULTS.md §14), so the residual
    # stream at a media position is its input at every layer. Off by default: in a 240-step align probe it
    # changed neither the loss curve nor exact match beyond noise (§14); untested on the full recipe.
    token_norm: bool = False
    # What the projector writes: "mlp", free vectors in the embedding space (LLaVA's and Phi-4's projector); or
    # "words", soft words: per token a softmax over the LM's vocabulary mixing its token embeddings, so a sharp token
    # is a word the LM reads as text from its first layer. Encoder pretraining teaches it each item's caption
    # (moelora.multimodal.pretraining). Why: a picture and a clip the mlp projector aligned on captions were
    # compared at chance by the LM in 160 steps, their written form in 40 (RESULTS.md §17c).
    projector: str = "mlp"
    # The most distinct tokens a words projector may write (its captions' tokens; the built-in suite's use ~60).
    word_vocabulary: int = 256
    # How a words projector composes its words: "mlp", one MLP over all feature tokens (RESULTS.md §18: 9M
    # parameters; in 12-28% of held-out scenes one shape's word is copied from a neighbour); "attention", a learned
    # query per output token attends over the feature tokens (2-layer decoder, ~0.5M parameters); "autoregressive",
    # the same decoder also told the words it wrote after each position (right to left, greedy; §18e: held-out
    # scene captions 91-100% where the others wrote 69-97%; the default).
    word_writer: str = "autoregressive"
    # A local HF vision model folder (CLIP/SigLIP, or its vision tower) as the image feature extractor instead of
    # our conv; None: ours (no download, trains from scratch). image_width is then the model's hidden size.
    image_model: str | None = None
    # A local HF Whisper-style audio encoder folder (WhisperModel or its encoder) instead of our conv; None: ours.
    audio_model: str | None = None

    def validate(self):
        if self.word_writer not in WORD_WRITERS:
            raise self.error("word_writer", f"must be {' or '.join(WORD_WRITERS)}, got {self.word_writer!r}")
        if self.projector not in PROJECTORS:
            raise self.error("projector", f"must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        for name in ("image_channels", "image_grid", "image_width", "n_mels", "audio_tokens", "audio_width",
                     "word_vocabulary"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("image_model", "audio_model"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise self.error(name, "must name a local Hugging Face model folder (or be null for our conv encoder)")
            if getattr(self, name):  # absolute, so a checkpoint finds the folder from any working directory
                setattr(self, name, str(Path(getattr(self, name)).expanduser().resolve()))
        if self.projector == "words" and self.pretrained():
            raise self.error("projector", f"words is taught in encoder pretraining, which trains our conv encoders "
                             f"only: use mlp with {' and '.join(k + '_model' for k in self.pretrained())}")

    def pretrained(self) -> dict[str, str]:
        """{"image"/"audio": folder} of the encoders that are pretrained HF models."""
        return {kind: path for kind, path in (("image", self.image_model), ("audio", self.audio_model)) if path}

    @property
    def media_tokens(self) -> dict[str, int]:
        """Placeholder tokens per image and per audio clip."""
        return {"image": self.image_grid ** 2, "audio": self.audio_tokens}


_GELU_RMS = 0.6518  # sqrt(E[GELU(z)^2]) for z ~ N(0, 1)


class TokenScale(nn.Module):
    """Rescales every token (last dim) to RMS `scale`; no parameters, so it adds no checkpoint keys."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rms = tokens.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()  # fp32: bf16 squares underflow
        return (tokens.float() * (self.scale / rms)).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


def mlp_projector(width: int, hidden: int, embed_std: float, token_norm: bool = False) -> nn.Sequential:
    """Linear . GELU . Linear whose outputs have the embeddings' RMS for unit-variance inputs: the first layer
    keeps the variance (no bias, which would add the same vector to every token), the last scales GELU's.
    `token_norm`: a TokenScale after it keeps them there through training (EncoderConfig.token_norm)."""
    proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                         *([TokenScale(embed_std)] if token_norm else []))
    with torch.no_grad():
        nn.init.normal_(proj[0].weight, std=1 / math.sqrt(width))
        proj[0].bias.zero_()
        nn.init.normal_(proj[2].weight, std=embed_std / (_GELU_RMS * math.sqrt(hidden)))
        proj[2].bias.zero_()
    return proj


class WordProjector(nn.Module):
    """Soft words: [n, tokens, width] features -> [n, tokens, d] mixtures of the LM's token embeddings.

    One MLP reads all of an item's feature tokens (a caption's k-th word may come from anywhere in the picture)
    and gives each output token a query vector; its logits are the query against the embeddings of the words it
    may write (the LM's own tied read-out, as its head scores a hidden state) and its output their softmax-weighted
    embeddings. Which words: `vocab_ids`, set by encoder pretraining to the tokens of the run's captions (-1 pads
    the fixed-size buffer, so checkpoints of any vocabulary load into the same shape); a softmax over all 49k
    tokens made pretraining ~15x slower on a CPU. The embedding table is the LM's (bound by `attach_encoders`,
    never saved here)."""

    def __init__(self, tokens: int, width: int, hidden: int, embed_std: float, vocabulary: int,
                 writer: str = "mlp"):
        super().__init__()
        self.tokens, self.hidden, self.writer = tokens, hidden, writer
        if writer == "mlp":  # all feature tokens flattened -> every output token's query at once
            self.net = nn.Sequential(nn.Linear(tokens * width, hidden), nn.GELU(), nn.Linear(hidden, tokens * hidden))
            first, last = self.net[0], self.net[2]
            fan_in = tokens * width
        else:  # "attention" / "autoregressive": the feature tokens attend to each other, then a learned query per
            # output position attends over them (a DETR/Q-Former-style decoder), so each written word reads the
            # cells it names; "autoregressive" also feeds each position the word written after it (right to left,
            # as the caption is right-aligned), under a causal mask: a captioner that knows what it has said
            layer = dict(nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True)
            self.mix = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, **layer), 1, enable_nested_tensor=False)
            self.slots = nn.Parameter(torch.randn(tokens, width) / math.sqrt(width))
            self.decode = nn.TransformerDecoder(nn.TransformerDecoderLayer(width, **layer), 2)
            self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            first, last = self.net[1], self.net[3]
            fan_in = width
            if writer == "autoregressive":  # the word written at the next position; row `vocabulary`: none yet
                self.previous = nn.Embedding(vocabulary + 1, width)
                nn.init.normal_(self.previous.weight, std=1 / math.sqrt(width))
        with torch.no_grad():  # logits start ~N(0, 1): a query of RMS 1/(embed_std sqrt(d)) against rows of RMS embed_std
            nn.init.normal_(first.weight, std=1 / math.sqrt(fan_in))
            first.bias.zero_()
            nn.init.normal_(last.weight, std=1 / (embed_std * math.sqrt(hidden) * _GELU_RMS * math.sqrt(hidden)))
            last.bias.zero_()
        self.register_buffer("vocab_ids", torch.full((vocabulary,), -1, dtype=torch.long))
        self.__dict__["_embedding"] = None  # a plain attribute: the LM's table is not this module's to save or move

    def bind(self, embedding: nn.Module) -> None:
        """Read the word embeddings from `embedding` (the LM's input embedding module)."""
        self.__dict__["_embedding"] = embedding

    def set_vocabulary(self, ids: list[int]) -> None:
        """The token ids this projector may write (sorted, distinct)."""
        ids = sorted(set(int(i) for i in ids))
        if len(ids) > len(self.vocab_ids):
            raise ConfigError("encoders.word_vocabulary", f"the captions use {len(ids)} distinct tokens, more than "
                              f"its {len(self.vocab_ids)}")
        with torch.no_grad():
            self.vocab_ids.fill_(-1)
            self.vocab_ids[:len(ids)] = torch.tensor(ids, dtype=torch.long)

    def words(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [V, d] of the words it may write, [V] bool: a real word, not padding)."""
        if self._embedding is None:
            raise RuntimeError("a words projector reads the LM's token embeddings: attach the encoders to a model "
                               "(MoELoRAModel.attach_encoders) before running them")
        if not torch.compiler.is_compiling() and bool(self.vocab_ids[0] < 0):  # one host read, for a clear error
            raise ConfigError("encoders.projector", "words: this projector has no vocabulary yet (encoder pretraining "
                              "sets it from the captions: encoder_pretraining_steps > 0)")
        return _rows(self._embedding.weight, self.vocab_ids.clamp(min=0)), self.vocab_ids >= 0

    def logits(self, features: torch.Tensor, said: torch.Tensor | None = None) -> torch.Tensor:
        """[n, tokens, width] -> [n, tokens, V] (fp32; -inf at the padding of `vocab_ids`). `said` [n, tokens]:
        for an autoregressive writer, the words (indices into `vocab_ids`) each position is told were written
        after it (teacher forcing, in pretraining); None: its own greedy words. Other writers ignore it."""
        if features.shape[1] != self.tokens:
            raise DataError(f"a words projector for {self.tokens} tokens got {features.shape[1]}")
        _zero3_attention(self)
        table, real = self.words()
        read = lambda queries: (queries.float() @ table.float().T).masked_fill(~real, float("-inf"))  # noqa: E731
        if self.writer != "autoregressive":
            return read(self.queries(features))
        memory = self.mix(features)
        if said is None:  # greedy, right to left
            said = torch.zeros(features.shape[:2], dtype=torch.long, device=features.device)
            with torch.no_grad():
                for step in range(self.tokens):
                    position = self.tokens - 1 - step
                    logits = read(self._decode(memory, said, first=position))
                    said[:, position] = logits[:, 0].argmax(-1)
            trains = torch.is_grad_enabled() and (memory.requires_grad or any(p.requires_grad for p in self.parameters()))
            if not trains:  # the last step read every position given the words after it: the final pass, done
                return logits
        return read(self._decode(memory, said))  # one pass over the words, with gradients

    def _decode(self, memory: torch.Tensor, said: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The autoregressive writer's queries [n, tokens - first, hidden] for positions first..tokens-1, each
        reading the words `said` at the positions after it (only those: a causal mask, right to left)."""
        after = torch.cat([said.new_full((memory.shape[0], 1), len(self.vocab_ids)), said[:, first + 1:].flip(1)], 1)
        steps = self.slots[first:].flip(0).to(memory.dtype) + self.previous(after).to(memory.dtype)
        causal = nn.Transformer.generate_square_subsequent_mask(steps.shape[1], device=memory.device, dtype=memory.dtype)
        return self.net(self.decode(steps, memory, tgt_mask=causal, tgt_is_causal=True)).flip(1)

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        """[n, tokens, width] -> [n, tokens, hidden]: what each output token looks for in the vocabulary (the mlp
        and attention writers: every token at once)."""
        if self.writer == "mlp":
            return self.net(features.flatten(1)).view(features.shape[0], self.tokens, self.hidden)
        memory = self.mix(features)
        return self.net(self.decode(self.slots.to(features.dtype).expand(features.shape[0], -1, -1), memory))

    def written(self, features: torch.Tensor) -> torch.Tensor:
        """[n, tokens] the token id most likely at each position: what the projector writes, read as text."""
        return self.vocab_ids[self.logits(features).argmax(-1)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        table, _ = self.words()
        return (self.logits(features).softmax(-1) @ table.float()).to(features.dtype)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, hidden={self.hidden}, vocabulary={len(self.vocab_ids)}, writer={self.writer}"


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """weight[ids], also where DeepSpeed ZeRO-3 has partitioned the LM's table: the projector reads it outside
    the table's own forward, where nothing gathers it, so it is gathered for the read. Those rows are then a copy
    (the base's table is frozen; a trained one still learns through its own forward, not through the words)."""
    if not hasattr(weight, "ds_id"):
        return weight[ids]
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight[ids].detach().clone()


def _zero3_attention(module: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, tell it that each nn.MultiheadAttention reads its out_proj's parameters: the
    attention calls F.multi_head_attention_forward with them instead of calling out_proj, so ZeRO-3, which gathers
    a module's parameters when that module runs, would hand it the empty partitions. Once per module, on the
    first call that sees partitioned parameters; nothing without DeepSpeed."""
    for attention in module.modules():
        if (isinstance(attention, nn.MultiheadAttention) and hasattr(attention.out_proj.weight, "ds_id")
                and not getattr(attention, "_moelora_zero3", False)):
            import deepspeed

            for p in attention.out_proj.parameters():
                deepspeed.zero.register_external_parameter(attention, p)
            attention._moelora_zero3 = True


PROJECTORS = ("mlp", "words")  # EncoderConfig.projector
WORD_WRITERS = ("mlp", "attention", "autoregressive")  # EncoderConfig.word_writer (WordProjector's writer)


def projector(cfg: EncoderConfig, tokens: int, width: int, hidden: int, embed_std: float) -> nn.Module:
    """The projector `cfg` asks for, from `tokens` feature tokens of `width` into the LM's `hidden` size."""
    if cfg.projector == "words":
        return WordProjector(tokens, width, hidden, embed_std, cfg.word_vocabulary, cfg.word_writer)
    return mlp_projector(width, hidden, embed_std, cfg.token_norm)


class TokenPositions(nn.Module):
    """Adds a learned vector per token slot to [n, tokens, width] features; zero at the start."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(tokens, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.table.to(features.dtype)


def token_positions(cfg: EncoderConfig, tokens: int, width: int) -> nn.Module:
    return TokenPositions(tokens, width) if cfg.position_embedding else nn.Identity()


def feature_extractor(cfg: EncoderConfig, layers: list[nn.Module], width: int) -> tuple[nn.Sequential, nn.Module]:
    """(conv stack, norm on its output tokens): He-initialised with zero biases and a LayerNorm under
    `feature_norm`, so features keep their input's variation; PyTorch's default init and no norm otherwise."""
    conv = nn.Sequential(*layers)
    if not cfg.feature_norm:
        return conv, nn.Identity()
    with torch.no_grad():
        for m in conv:
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # GELU ~ ReLU for the variance
                m.bias.zero_()
    return conv, nn.LayerNorm(width)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, hidden: int, embed_std: float):
        super().__init__()
        w = cfg.image_width
        self.cfg = cfg
        self.conv, self.norm = feature_extractor(cfg, [
            nn.Conv2d(cfg.image_channels, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(cfg.image_grid),
        ], w)
        self.pos = token_positions(cfg, cfg.image_grid ** 2, w)
        self.proj = projector(cfg, cfg.image_grid ** 2, w, hidden, embed_std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] -> [n, grid², width]: what the projector reads."""
        if images.dim() != 4 or images.shape[1] != self.cfg.image_channels:
            raise DataError(f"images must be [n, {self.cfg.image_channels}, H, W], got {list(images.shape)}")
        if self.cfg.feature_norm:
            images = images * 2 - 1  # [0, 1] -> [-1, 1]: zero-centred, as SigLIP normalises
        return self.pos(self.norm(self.conv(images).flatten(2).transpose(1, 2)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] -> [n, grid², hidden]."""
        return self.proj(self.features(images))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, hidden: int, embed_std: float):
        super().__init__()
        w = cfg.audio_width
        self.cfg = cfg
        self.conv, self.norm = feature_extractor(cfg, [  # log-mels are already ~[-1, 1] (Whisper's scaling)
            nn.Conv1d(cfg.n_mels, w, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(w, w, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(w, w, 5, stride=2, padding=2), nn.GELU(),
            nn.AdaptiveAvgPool1d(cfg.audio_tokens),
        ], w)
        self.pos = token_positions(cfg, cfg.audio_tokens, w)
        self.proj = projector(cfg, cfg.audio_tokens, w, hidden, embed_std)

    def features(self, mels: torch.Tensor) -> torch.Tensor:
        """[n, n_mels, frames] -> [n, audio_tokens, width]: what the projector(s) read."""
        if mels.dim() != 3 or mels.shape[1] != self.cfg.n_mels:
            raise DataError(f"audio features must be [n, {self.cfg.n_mels}, frames], got {list(mels.shape)}")
        return self.pos(self.norm(self.conv(mels).transpose(1, 2)))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """[n, n_mels, frames] -> [n, audio_tokens, hidden]."""
        return self.proj(self.features(mels))


PARTS = ("encoders", "projectors")  # what freeze_* and *_learning_rate name (besides the adapters)
MEDIA_KINDS = ("image", "audio")  # the encoders a multimodal model owns; what per-modality rates name


def part_of(name: str) -> str:
    """"encoders" or "projectors" for a parameter name inside an encoder ("conv.0.weight", "proj.2.bias",
    "backbone.…", "proj_vision_speech.0.weight"): the projectors are the children named proj*."""
    return "projectors" if name.split(".", 1)[0].startswith("proj") else "encoders"


def build_encoder(kind: str, cfg: EncoderConfig, hidden: int, embed_std: float) -> nn.Module:
    """The image or audio encoder `cfg` asks for: ours, or a pretrained HF model behind our projector."""
    if cfg.pretrained().get(kind):
        from .pretrained import PretrainedAudioEncoder, PretrainedImageEncoder

        return (PretrainedImageEncoder if kind == "image" else PretrainedAudioEncoder)(cfg, hidden, embed_std)
    return (ImageEncoder if kind == "image" else AudioEncoder)(cfg, hidden, embed_std)


def __getattr__(name):  # the old import path of the encoders module (now `model.MediaEncoders`)
    if name == "MultimodalEncoders":
        from .model import MediaEncoders

        return MediaEncoders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
