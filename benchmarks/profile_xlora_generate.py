#!/usr/bin/env python
"""Where X-LoRA's cached generation spends its time: tokens/s of ours vs the base model, then cProfile of ours.

    python benchmarks/profile_xlora_generate.py --workdir /tmp/bench-experts --new-tokens 16

Same setup as bench_generate.py (4 PEFT experts r=8 on q,k,v,o; batch 1; 32-token prompt; greedy).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cases import build_case  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--top", type=int, default=20, help="rows of the profile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prof-xlora-"))
    ours = build_case("xlora", args.base, workdir).eval()
    base = build_case("base", args.base, workdir).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    with torch.no_grad():
        for name, model in (("base", base), ("xlora", ours)):
            model.generate(**kw)  # warm-up
            t0 = time.perf_counter()
            model.generate(**kw)
            print(f"{name}: {n / (time.perf_counter() - t0):.2f} tokens/s")
        profile = cProfile.Profile()
        profile.runcall(ours.generate, **kw)
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
