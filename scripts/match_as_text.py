#!/usr/bin/env python
"""digit_audio_match with the picture and the clip written out as text: can the LM side learn the comparison at all?
(issue 18, RESULTS.md §17)

    python scripts/match_as_text.py --out runs/match_text --spoken word   # "Picture: 7\\nSpoken: seven\\n..."
    python train.py --config configs/lora.yaml method.r=16 method.alpha=32 'method.target_modules=[q_proj,v_proj]' \\
      data.train_files=[runs/match_text/train.jsonl] data.eval_files=[runs/match_text/eval.jsonl] max_steps=150 \\
      warmup_ratio=0.05 report_to=[jsonl] output_dir=runs/match_text/run

The question is digit_audio_match's own, yes half the time, the spoken digit otherwise drawn from the nine
others, as `moelora.data.multimodal` draws it. `--spoken word` writes the spoken digit as a word ("seven", what
the caption align teaches the LM to read from a clip), `--spoken digit` as a digit ("7": the same token as the
picture's, so the LM's own duplicate-token detection can answer). There are only 100 (digit, spoken) pairs, so the
held-out rows repeat training pairs, as the multimodal task's do (its held-out split is new scans and voices,
not new pairs): this measures whether the comparison is learned, not generalisation. If the LoRA cannot learn even the text form in
the steps stage 2 gives the task, no encoder will make the multimodal task pass.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelora.data.multimodal import DIGIT_WORDS  # noqa: E402

QUESTION = "Is the spoken number the digit in the picture? Answer yes or no."  # digit_audio_match's


def rows(n: int, seed: int, spoken: str) -> list[dict]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        d = rng.randrange(10)
        said = d if rng.random() < 0.5 else rng.choice([x for x in range(10) if x != d])
        heard = DIGIT_WORDS[said] if spoken == "word" else str(said)
        out.append({"task": "match_text", "instruction": f"Picture: {d}\nSpoken: {heard}\n{QUESTION}",
                    "response": "yes" if said == d else "no"})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--spoken", choices=["word", "digit"], default="word")
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-eval", type=int, default=64)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.n_train, 1), ("eval", args.n_eval, 2)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed, args.spoken)))


if __name__ == "__main__":
    main()
