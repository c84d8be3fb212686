#!/usr/bin/env python
"""Greedy generation tokens/s with a KV cache for every method, and X-LoRA against PEFT's X-LoRA.

    python benchmarks/bench_generate.py --json benchmarks/results/generate.json      # every case, 64 tokens
    python benchmarks/bench_generate.py --cases xlora --new-tokens 128                # X-LoRA vs PEFT only
    python benchmarks/bench_generate.py --device cuda --base random-smollm2-135m     # on a GPU

Setup as `research/peft-anchors.md`: batch 1, a 32-token random prompt, exactly --new-tokens greedy tokens
(min = max), fp32 and 2 threads unless --dtype, --threads or --device say otherwise. Every case (and its
peer from `cases.py`) is built in this process on the same base weights; 1 warm-up call each, then --runs timed calls round robin over the cases (median). PEFT's X-LoRA
turns the KV cache off and takes ~1 minute per call, so it gets --peft-xlora-runs calls. Our X-LoRA loads the
same expert folders and PEFT's classifier weights: both compute the same function, and the script reports
whether they generated identical tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cases import CASES, DTYPES, add_device_args, build_case, make_batch, machine, peft_xlora_head, sync  # noqa: E402

GEN_CASES = list(CASES)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--cases", nargs="*", default=[n for n in GEN_CASES if not n.startswith("peft")],
                        choices=GEN_CASES, help="our cases; their peers are added")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peft-xlora-runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    add_device_args(parser)
    parser.add_argument("--workdir", default=None, help="X-LoRA expert folders (default: a temp dir)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gen-"))

    names = list(dict.fromkeys(args.cases + [CASES[n].peer for n in args.cases if CASES[n].peer]))
    names.sort(key=lambda n: n != "peft_xlora")  # PEFT X-LoRA first: ours copies its classifier
    n_new = args.new_tokens
    calls, outputs, head = {}, {}, None
    for name in names:
        model = build_case(name, args.base, workdir, head, args.device, DTYPES[args.dtype]).eval()
        if name == "peft_xlora":
            head = peft_xlora_head(model)
        gen = torch.Generator().manual_seed(4321)  # the same prompt ids for every case
        inputs = make_batch(name, model.get_input_embeddings().num_embeddings, 1, args.prompt_len, gen,
                            getattr(model, "media_tokens", None), args.device, DTYPES[args.dtype])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])

        def call(model=model, inputs=inputs, tokens=n_new):
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        call(tokens=2 if name == "peft_xlora" else 8)  # warm-up
        calls[name] = call
    times = {name: [] for name in names}
    for i in range(args.runs):
        for name in names:
            if name == "peft_xlora" and i >= args.peft_xlora_runs:
                continue
            t0 = time.perf_counter()
            outputs[name] = calls[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)

    header = (f"{machine(args)}, torch {torch.__version__}, {args.dtype}, {args.base}, batch 1, prompt {args.prompt_len}, {n_new} new tokens, greedy, KV cache on (PEFT X-LoRA: "
              f"off, forced by PEFT), median of {args.runs} ({args.peft_xlora_runs} for PEFT X-LoRA), "
              f"1-min load average {os.getloadavg()[0]:.2f} at the end")
    print("# " + header)
    print("| case | peer | median s | tokens/s | speed vs peer | runs (s) |")
    print("|---|---|---:|---:|---:|---|")
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        peer = CASES[name].peer
        speed = statistics.median(times[peer]) / med if peer else None
        rows[name] = {"median_s": med, "times_s": times[name], "tokens_per_s": n_new / med, "peer": peer,
                      "speed_vs_peer": speed}
        print(f"| {name} | {peer or '–'} | {med:.2f} | {n_new / med:.2f} | {f'{speed:.2f}x' if speed else '–'} "
              f"| {[round(t, 2) for t in times[name]]} |")
    if "xlora" in outputs and "peft_xlora" in outputs:
        same = bool(torch.equal(outputs["xlora"], outputs["peft_xlora"]))
        rows["xlora"]["identical_tokens_to_peer"] = same
        print(f"X-LoRA: identical tokens to PEFT's X-LoRA: {same}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
