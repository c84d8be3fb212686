#!/usr/bin/env python
"""Is the colour that shape_color asks for in the image tokens the LM receives? Or the shape's kind? (issue 18)

    python scripts/probe_shape_colour.py runs/perceive/v4_lora16/adapter > benchmarks/results/perception_2026-12-02/v4_colour_probe.json
    python scripts/probe_shape_colour.py --read kind runs/perceive/cap_align/adapter   # square / cross / triangle

Logistic-regression probes (scripts/probe_perception.py's), trained on the shape_color training split (seed 42,
600 scenes) and scored on 64 held-out scenes, read the named shape's colour from the raw pixels, from the
checkpoint's conv features and from its projected tokens; once on the scenes with one shape (no binding
needed: the colour of the only shape) and once on all scenes. A probe that reads the colour where the LM
does not puts the fault on the LM side (attention to the shape's tokens, the answer prior), not the encoder.
``--read kind`` probes the named shape's kind instead (the question names it, so the LM must find it): the
three stencils have 9 pixels each, so the kind is in the pattern, not in the amount of colour.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_perception import probe_accuracy, stages  # noqa: E402

from moelora.data.multimodal import build_multimodal_suite  # noqa: E402


def scenes(rows, one_shape: bool, read: str = "colour"):
    rows = [r for r in rows if not one_shape or len(r["sources"][0][1].shapes) == 1]
    labels = [r["response"] if read == "colour" else _asked_kind(r) for r in rows]
    return torch.stack([r["images"][0] for r in rows]), labels


def _asked_kind(row) -> str:
    """The shape the question names ("What colour is the square? ...")."""
    return row["instruction"].split("What colour is the ", 1)[1].split("?", 1)[0]


def main(argv=None):
    import moelora

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a multimodal adapter folder with our conv image encoder")
    p.add_argument("--read", choices=["colour", "kind"], default="colour",
                   help="what the probes read: the named shape's colour (the answer) or its kind (in the question)")
    args = p.parse_args(argv)
    checkpoint = args.checkpoint
    train, evals = build_multimodal_suite(["shape_color"], n_train_per_task=600, n_eval_per_task=64, seed=42)
    model, _ = moelora.load(checkpoint)
    model.eval()
    encoder = model.encoders.image
    report = {}
    for label, one in (("one shape", True), ("1-3 shapes", False)):
        (xt, yt), (xe, ye) = scenes(train, one, args.read), scenes(evals, one, args.read)
        (ct, pt), (ce, pe) = stages(encoder, xt), stages(encoder, xe)
        report[label] = {"held-out scenes": len(ye),
                         "raw pixels": probe_accuracy(xt.flatten(1).numpy(), yt, xe.flatten(1).numpy(), ye),
                         "conv features": probe_accuracy(ct, yt, ce, ye),
                         "projected tokens": probe_accuracy(pt.flatten(1).numpy(), yt, pe.flatten(1).numpy(), ye),
                         f"chance (most frequent {args.read})": max(ye.count(c) for c in set(ye)) / len(ye)}
    print(json.dumps({"checkpoint": checkpoint, "reads": args.read, "probe accuracy": report}, indent=1))


if __name__ == "__main__":
    main()
