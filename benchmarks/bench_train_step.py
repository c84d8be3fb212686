#!/usr/bin/env python
"""Training step time and peak memory of moelora methods against PEFT LoRA, in one process.

    python benchmarks/bench_train_step.py                       # SmolLM2-135M, every case, CPU
    python benchmarks/bench_train_step.py --cases peft_lora64 smora64_8 --steps 5 --json out.json

Each case builds a fresh model on the same base weights and runs the same batches (random token ids,
batch x seq, labels = inputs) with AdamW over the trainable parameters: zero_grad + forward + backward
+ step, as peft-anchors.md measures PEFT. Cases run interleaved (round robin over repeats) so drift on
a shared machine hits every case alike; the table reports medians and min-max, and every ratio is
against the PEFT LoRA case of the same total rank, measured in this same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (builder kind, kwargs, peer case for the ratio)
CASES = {
    "peft_lora8": ("peft", dict(r=8, lora_alpha=16), None),
    "peft_lora64": ("peft", dict(r=64, lora_alpha=128), None),
    "lora8": ("moelora", dict(name="lora", r=8, alpha=16), "peft_lora8"),
    "lora64": ("moelora", dict(name="lora", r=64, alpha=128), "peft_lora64"),
    "smora64_8": ("moelora", dict(name="smora", r=64, k=8, alpha=16), "peft_lora64"),
}


def build(kind: str, kwargs: dict, base_name: str):
    from moelora.base_models import resolve_base_model

    torch.manual_seed(0)
    base, _ = resolve_base_model(base_name)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, target_modules=ALL7, **kwargs))
    import moelora

    return moelora.get_moelora_model(base, {"target_modules": ALL7, **kwargs})


def make_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    update = getattr(model, "update_router_state", None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        if update is not None:
            update()  # SMoRA's once-per-step bias update is part of its step

    return step, sum(p.numel() for p in params)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    steps, params = {}, {}
    vocab = None
    for name in args.cases:
        kind, kwargs, _ = CASES[name]
        model = build(kind, kwargs, args.base)
        vocab = vocab or model.get_input_embeddings().num_embeddings
        batch = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=gen)}
        steps[name], params[name] = make_step(model, batch)
        for _ in range(args.warmup):
            steps[name]()
    times = {name: [] for name in args.cases}
    for _ in range(args.steps):  # round robin: drift on a shared machine hits every case alike
        for name in args.cases:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        gc.collect()

    tokens = args.batch * args.seq
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.base}, batch {args.batch} x seq {args.seq}, median of {args.steps} after {args.warmup} warm-up")
    print("| case | trainable | median s/step | min-max s | tokens/s | vs peer |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {}
    for name in args.cases:
        med = statistics.median(times[name])
        peer = CASES[name][2]
        ratio = med / statistics.median(times[peer]) if peer in times else None
        rows[name] = {"median_s": med, "times_s": times[name], "trainable": params[name], "peer": peer, "ratio": ratio}
        print(f"| {name} | {params[name]:,} | {med:.3f} | {min(times[name]):.2f}-{max(times[name]):.2f} | "
              f"{tokens / med:.0f} | {f'{ratio:.2f}x {peer}' if ratio else '-'} |")
    print(f"peak RSS of the process (all cases together): {peak_rss_mb():.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cases": rows, "peak_rss_mb": peak_rss_mb()}, f, indent=2)


if __name__ == "__main__":
    main()
