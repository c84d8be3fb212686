#!/usr/bin/env python
"""Encoder pretraining alone, as a run config would do it, with no LM training (issue 18): minutes, not half an hour.

    python scripts/probe_pretraining.py --config configs/perceive/lora16.yaml encoder_pretraining_steps=1500 \
      'encoder_pretraining_data={caption_shapes: 12000}'

Builds the run's data (plus encoder_pretraining_data), its model with encoders, pretrains them exactly as
train.py does before its first step, and prints the report (held-out accuracy per label group and, for words
projectors, whole captions, also per task of the held-out split) with the seconds it took, as one JSON object.
Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


PER_TASK = ("digit_read", "shape_color", "shape_count", "spoken_digit", "digit_audio_match")  # held-out captions by task


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted key=value, as train.py takes them")
    args = ap.parse_args(argv)

    from accelerate.utils import set_seed

    import moelora
    from moelora.base_models import resolve_base_model
    from moelora.multimodal.model import attach_seeded_encoders
    from moelora.multimodal.pretraining import pretrain_encoders
    from moelora.training.examples import load_examples, load_pretraining_examples
    from moelora.training.run_config import load_run_config
    from scripts.read_soft_words import captions_by_task

    cfg = load_run_config(args.config, args.overrides)
    if not cfg.encoder_pretraining_steps:
        raise SystemExit("encoder_pretraining_steps is 0: nothing to probe")
    train_examples, eval_examples = load_examples(cfg)
    base, tokenizer = resolve_base_model(cfg.base_model)
    set_seed(cfg.seed)  # as train.py: the adapter, then the encoders on their own stream, start as the run's
    model = moelora.get_moelora_model(base, cfg.method_config)
    attach_seeded_encoders(model, cfg.encoders, cfg.seed)
    start = time.perf_counter()
    report = pretrain_encoders(model.encoders, train_examples + load_pretraining_examples(cfg), eval_examples,
                               cfg.encoder_pretraining_steps, cfg.seed, tokenizer)
    report["seconds"] = round(time.perf_counter() - start, 1)
    tasks = [t for t in PER_TASK if t in {ex["task"] for ex in eval_examples}]
    report["captions right by task"] = {task: entry["captions right (%)"] for task, entry in captions_by_task(
        model.encoders, tokenizer, eval_examples, tasks, show=0).items()}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
