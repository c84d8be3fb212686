#!/usr/bin/env python
"""Can our conv image encoder tell a square from a cross from a triangle when it is taught to directly? (issue 18)

    python scripts/probe_encoder_kind.py --seeds 0 1 \
      > benchmarks/results/perception_2026-12-07_s14/encoder_kind_supervised.json

A fresh `ImageEncoder` (the perceiving recipe's: grid 4, feature_norm, position embeddings) and one linear head
over its 16 feature tokens are trained together, with AdamW at 1e-3 and batches of 64 shape_color-style scenes
(1-3 shapes of different kinds), to name the kind in each of the 9 cells (or "empty"). Accuracy is over the
occupied cells of 512 held-out scenes. The three stencils have 9 pixels each, so the kind is in the pattern
only. If the encoder learns this in a few hundred steps, an align run whose captions get the kinds wrong is
failing on the signal that reaches the encoder through the frozen LM, not on what the encoder can represent.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora.data import images  # noqa: E402
from moelora.data.multimodal import LABEL_GROUPS, source_labels  # noqa: E402  (the pretraining labels)
from moelora.data.multimodal import _scene as draw_scene  # noqa: E402  (the suite's own scene sampler)
from moelora.multimodal.encoders import EncoderConfig, ImageEncoder  # noqa: E402

EMBED_STD = 0.133  # SmolLM2-135M's token-embedding RMS (RESULTS.md §14): the projector's init scale (unused here)


def scenes(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n pictures drawn as shape_color's (1-3 shapes of different kinds) and, per picture, the kind index + 1 in
    each of the 9 cells (0: empty)."""
    pictures, labels = [], []
    for _ in range(n):
        source = draw_scene(rng, rng.randint(1, 3), distinct_shapes=True)
        pictures.append(images.render_scene(source[1]))
        labels.append([source_labels(source)[1][i] for i in LABEL_GROUPS["image"]["kinds"]])
    return torch.stack(pictures), torch.tensor(labels)


def run(seed: int, steps: int, report_at: list[int]) -> dict:
    torch.manual_seed(seed)
    rng, held_out_rng = random.Random(seed), random.Random(10_000 + seed)
    x_eval, y_eval = scenes(held_out_rng, 512)
    cfg = EncoderConfig(image_grid=4)
    encoder = ImageEncoder(cfg, hidden=576, embed_std=EMBED_STD)
    head = nn.Linear(cfg.image_grid ** 2 * cfg.image_width, 9 * (1 + len(images.SHAPES)))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)

    def logits(x):
        return head(encoder.features(x).flatten(1)).view(len(x), 9, -1)

    curve = {}
    for step in range(1, steps + 1):
        x, y = scenes(rng, 64)
        loss = nn.functional.cross_entropy(logits(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in report_at:
            with torch.no_grad():
                occupied = y_eval > 0
                acc = (logits(x_eval).argmax(-1)[occupied] == y_eval[occupied]).float().mean().item()
            curve[step] = {"train loss": round(loss.item(), 4), "held-out kind accuracy": round(acc, 4)}
    return curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args(argv)
    report_at = sorted({s for s in (50, 100, 200, 400, args.steps) if s <= args.steps})
    print(json.dumps({"steps": args.steps, "batch": 64, "lr": 1e-3,
                      "per seed": {seed: run(seed, args.steps, report_at) for seed in args.seeds}}, indent=1))


if __name__ == "__main__":
    main()
