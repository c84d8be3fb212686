"""Encoder pretraining: our conv encoders learn what the suite's pictures and clips show before the LM sees them.

Real recipes start from a pretrained vision or speech encoder (LLaVA's CLIP, Phi-4's SigLIP and its audio
encoder) and only align a projector to the LM. Ours start random, and learning a shape's kind only through the
caption's kind words, back through the frozen 135M LM, worked in some align runs and not in others (whole scene
captions 34-91% for one config; RESULTS.md §16), while the same encoder taught the kinds directly named them in
100% of held-out cells within 200 steps (§16c). So a run can first pretrain its encoders on labels: for every
picture and clip in its training examples, linear heads over the encoder's feature tokens predict each slot of
`data.multimodal.LABEL_SLOTS` (a digit; each grid cell's kind and colour; each spoken word). Only the feature
extractors and the heads train (the heads are then dropped); the projectors stay as they are, for the align
stage to fit. No LM runs, so it takes about a minute on a CPU.

A projector that writes soft words (`encoders.projector: words`) has text targets, so it trains here too: its k-th
token to the k-th token of the item's caption ("red square, blue cross"; `data.multimodal.source_caption`), the
caption right-aligned and the tokens before it spaces, so the caption sits next to the text after the item. The
LM's tokenizer then comes along; the LM itself still does not run (the logits are the LM's embedding table read
against the projector's queries).

    report = pretrain_encoders(model.encoders, train_examples, eval_examples, steps=300, seed=42, tokenizer=tok)

Runs with their own torch RNG stream (forked), so the run's later random draws are those of a run without it.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from ..data.multimodal import IGNORE, LABEL_GROUPS, LABEL_SLOTS, source_caption, source_labels
from ..errors import ConfigError
from .encoders import WordProjector, part_of

BATCH = 64  # pictures (and clips) per step: as the direct kind probe that learned in 200 steps (RESULTS §16c)
LEARNING_RATE = 1e-3  # AdamW's peak rate; the same probe's
WARMUP = 0.05  # share of the steps the rate rises over, then it decays to 0 on a cosine (as the run's own schedule)
HELD_OUT_MAX = 512  # held-out items scored per kind (enough for a 1-point resolution, fast on a CPU)
PAD_TEXT = " "  # what a words projector writes before a caption shorter than its tokens: spaces


def labelled_media(examples: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """{"image"|"audio": (inputs [n, ...], labels [n, slots], captions)} of every distinct picture/clip in `examples`."""
    items: dict[str, dict] = {"image": {}, "audio": {}}
    for ex in examples:
        pictures, clips = iter(ex.get("images", ())), iter(ex.get("audio", ()))
        for source in ex.get("sources", ()):
            kind, labels = source_labels(source)
            tensor = next(pictures if kind == "image" else clips)
            items[kind].setdefault(source, (tensor, labels, source_caption(source)))
    return {kind: (torch.stack([t for t, _, _ in found.values()]), torch.tensor([lab for _, lab, _ in found.values()]),
                   [cap for _, _, cap in found.values()])
            for kind, found in items.items() if found}


def caption_targets(captions: list[str], tokenizer, tokens: int) -> torch.Tensor:
    """[n, tokens] token ids: each caption right-aligned, PAD_TEXT's token before it."""
    pad = tokenizer(PAD_TEXT, add_special_tokens=False).input_ids
    if len(pad) != 1:
        raise ConfigError("encoders.projector", f"words needs {PAD_TEXT!r} to be one token of the tokenizer, got {pad}")
    rows = []
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        if len(ids) > tokens:
            raise ConfigError("encoders.projector", f"words: the caption {caption!r} is {len(ids)} tokens, more than "
                              f"the {tokens} an item has (raise encoders.image_grid / audio_tokens)")
        rows.append(pad * (tokens - len(ids)) + ids)
    return torch.tensor(rows)


class SlotHeads(nn.Module):
    """One linear classifier per label slot over all of an item's feature tokens (flattened): a slot may be
    anywhere in the picture or clip, as the LM's attention may read any token."""

    def __init__(self, tokens: int, width: int, slots: tuple[int, ...]):
        super().__init__()
        self.slots = slots
        self.linear = nn.Linear(tokens * width, sum(slots))

    def loss_and_hits(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.linear(features.flatten(1).float()).split(self.slots, dim=-1)
        loss = sum(nn.functional.cross_entropy(lg, labels[:, i], ignore_index=IGNORE, reduction="sum")
                   for i, lg in enumerate(logits)) / (labels != IGNORE).sum().clamp(min=1)
        hits = torch.stack([lg.argmax(-1) for lg in logits], dim=1) == labels
        return loss, {"hits": hits, "counted": labels != IGNORE}


def _accuracy(hits: dict, kind: str, labels: torch.Tensor) -> dict[str, float]:
    """Per group, the share of counted slots right; cells and words count only where something is there (most
    cells are empty: counting them would reward a head that always says "empty")."""
    out = {}
    for group, cols in LABEL_GROUPS[kind].items():
        counted = hits["counted"][:, cols] & ((labels[:, cols] > 0) if group != "digit" else True)
        if counted.any():
            out[group] = round(hits["hits"][:, cols][counted].float().mean().item() * 100, 1)
    return out


def _word_projectors(encoder) -> dict[str, WordProjector]:
    return {name: m for name, m in encoder.named_children() if isinstance(m, WordProjector)}


def _caption_hits(proj: WordProjector, features: torch.Tensor, targets: torch.Tensor) -> float:
    """% of items whose every token's most likely word is its target token id."""
    return round((proj.written(features) == targets).all(-1).float().mean().item() * 100, 1)


def _rate(step: int, steps: int) -> float:
    """The learning rate's share of LEARNING_RATE at `step`: linear warm-up over WARMUP of the steps, then cosine
    decay to 0, the schedule of the run's own training (configs/perceive/*.yaml)."""
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def pretrain_encoders(encoders, train_examples: list[dict], eval_examples: list[dict], steps: int,
                      seed: int, tokenizer=None) -> dict:
    """Train the feature extractors of `encoders` (a MediaEncoders), and its words projectors, on the media of
    `train_examples`; returns {kind: {"items": n, "held-out accuracy": {group: %}, "final loss": x}} (held-out:
    `eval_examples`' media; "captions": a words projector's whole caption right)."""
    train_media, eval_media = labelled_media(train_examples), labelled_media(eval_examples)
    kinds = [k for k in train_media if hasattr(getattr(encoders, k), "features")]
    if not kinds:
        raise ConfigError("encoder_pretraining_steps", "needs pictures or clips from the built-in multimodal suite "
                          "for encoders of our own (a pretrained encoders.image_model/audio_model is pretrained already)")
    words = {kind: _word_projectors(getattr(encoders, kind)) for kind in kinds}
    if any(words.values()) and tokenizer is None:
        raise ConfigError("encoders.projector", "words: encoder pretraining needs the LM's tokenizer for the captions")
    report = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = random.Random(seed)
        encs = {kind: getattr(encoders, kind) for kind in kinds}
        dtypes = {kind: next(enc.parameters()).dtype for kind, enc in encs.items()}  # the inputs' cast
        nets, targets = {}, {}
        for kind, enc in encs.items():
            with torch.no_grad():
                tokens, width = enc.features(train_media[kind][0][:1].to(dtypes[kind])).shape[1:]
            nets[kind] = SlotHeads(tokens, width, LABEL_SLOTS[kind])
            if words[kind]:  # token ids, then (train) as indices into the words the projectors may write
                targets[kind] = {split: caption_targets(media[kind][2], tokenizer, tokens)
                                 for split, media in (("train", train_media), ("eval", eval_media)) if kind in media}
                vocab = targets[kind]["train"].unique()
                for proj in words[kind].values():
                    proj.set_vocabulary(vocab.tolist())
                targets[kind]["train"] = torch.searchsorted(vocab, targets[kind]["train"])
        params = [p for enc in encs.values() for name, p in enc.named_parameters()
                  if part_of(name) == "encoders"] + [p for h in nets.values() for p in h.parameters()]
        params += [p for projs in words.values() for proj in projs.values() for p in proj.parameters()]
        was = {id(p): p.requires_grad for p in params}
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate(step, steps))
        losses = {}
        for _ in range(steps):
            total = 0.0
            for kind, enc in encs.items():
                x, y = train_media[kind][:2]
                pick = torch.tensor(order.sample(range(len(x)), min(BATCH, len(x))))
                features = enc.features(x[pick].to(dtypes[kind]))
                loss, _ = nets[kind].loss_and_hits(features, y[pick])
                for proj in words[kind].values():  # each item's caption, a word per token (told the words after)
                    said = targets[kind]["train"][pick]
                    loss = loss + nn.functional.cross_entropy(proj.logits(features, said).flatten(0, 1), said.flatten())
                losses[kind] = loss.item()
                total = total + loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
        for p in params:
            p.requires_grad_(was[id(p)])
            p.grad = None
        with torch.no_grad():
            for kind, enc in encs.items():
                entry = {"items": len(train_media[kind][0]), "final loss": round(losses.get(kind, float("nan")), 4)}
                if kind in eval_media:
                    x, y = (t[:HELD_OUT_MAX] for t in eval_media[kind][:2])
                    features = enc.features(x.to(dtypes[kind]))
                    _, hits = nets[kind].loss_and_hits(features, y)
                    entry["held-out accuracy"] = _accuracy(hits, kind, y)
                    for name, proj in words[kind].items():
                        key = "captions" if name == "proj" else f"captions ({name})"
                        entry["held-out accuracy"][key] = _caption_hits(proj, features,
                                                                       targets[kind]["eval"][:HELD_OUT_MAX])
                report[kind] = entry
    return report
