#!/usr/bin/env python
"""What a words projector writes for the held-out pictures and clips of a run (issue 18).

    python scripts/read_soft_words.py runs/perceive/words_s2 --tasks shape_color digit_audio_match --show 5

A checkpoint with `encoders.projector: words` hands the LM soft words; their most likely token at each position,
decoded, is what the encoder says it sees. Per task of the built-in multimodal suite's held-out split (the run's
seed and split size, from its run_config.json), every picture and clip is read and compared with its caption
(`data.multimodal.source_caption`); prints one JSON object: {task: {"items", "captions right (%)", "misses"}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moelora  # noqa: E402
from moelora.base_models import resolve_base_model  # noqa: E402
from moelora.data.multimodal import build_multimodal_suite, source_caption  # noqa: E402
from moelora.multimodal.encoders import WordProjector  # noqa: E402
from moelora.multimodal.pretraining import PAD_TEXT  # noqa: E402


def captions_by_task(encoders, tok, held_out: list[dict], tasks: list[str], show: int = 3) -> dict:
    """{task: {"items", "captions right (%)", "misses"}}: what `encoders` (a model's MediaEncoders, bound to its
    LM) write for each picture and clip of `held_out`'s examples of `tasks`, against their captions."""
    report = {}
    for task in tasks:
        rows = [ex for ex in held_out if ex["task"] == task]
        right, misses = 0, []
        for ex in rows:
            pictures, clips = iter(ex.get("images", ())), iter(ex.get("audio", ()))
            for source in ex["sources"]:
                kind = "audio" if source[0] == "speech" else "image"
                encoder = getattr(encoders, kind)
                with_image = any(s[0] != "speech" for s in ex["sources"])  # Phi-4's vision-speech projector
                proj = encoder.proj_vision_speech if kind == "audio" and with_image and hasattr(
                    encoder, "proj_vision_speech") else encoder.proj
                if not isinstance(proj, WordProjector):
                    raise SystemExit(f"the {kind} projector does not write words (encoders.projector)")
                with torch.no_grad():
                    ids = proj.written(encoder.features(next(pictures if kind == "image" else clips)[None]))[0]
                text = tok.decode(ids.tolist()).lstrip(PAD_TEXT)
                want = source_caption(source)
                right += text == want
                if text != want and len(misses) < show:
                    misses.append({"wrote": text, "caption": want})
        n = sum(len(ex["sources"]) for ex in rows)
        report[task] = {"items": n, "captions right (%)": round(100 * right / max(n, 1), 1), "misses": misses}
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder (with run_config.json and adapter/)")
    ap.add_argument("--tasks", nargs="+", default=["digit_read", "shape_color", "spoken_digit", "digit_audio_match"])
    ap.add_argument("--show", type=int, default=3, help="misses listed per task")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = json.loads((run / "run_config.json").read_text())
    base, tok = resolve_base_model(cfg["base_model"])
    model = moelora.MoELoRAModel.from_pretrained(base, run / "adapter").eval()
    _, held_out = build_multimodal_suite(args.tasks, 1, cfg["data"]["n_eval_per_task"], cfg["seed"])
    report = captions_by_task(model.encoders, tok, held_out, args.tasks, args.show)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
