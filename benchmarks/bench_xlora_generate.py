#!/usr/bin/env python
"""X-LoRA generation: moelora's two-KV-cache decoding vs PEFT's XLoraModel.generate (which disables the cache).

    python benchmarks/bench_xlora_generate.py                 # SmolLM2-135M, 4 experts, 128 new tokens, batch 1
    python benchmarks/bench_xlora_generate.py --new-tokens 16 --base tiny-random-llama   # a quick smoke run

Setup (as research/peft-anchors.md): four PEFT LoRA experts r=8, alpha=16 on q/k/v/o with lora_B ~ N(0, 0.02)
(seeds 100-103), PEFT X-LoRA with hidden_size 576, xlora_depth 2, xlora_size 256; ours loads the same expert
folders and PEFT's classifier weights, so both models are the same function. Prompt: 32 random tokens, greedy,
exactly --new-tokens new tokens (min = max). Ours: 1 warm-up + --runs timed calls (median); PEFT: one warm-up of
2 tokens and --peft-runs timed calls (it takes minutes). Prints both times, the ratio and whether the generated
tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_experts(base_name: str, folder: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from moelora.base_models import resolve_base_model

    paths = []
    for i in range(n):
        path = folder / f"expert_{i}"
        if not (path / "adapter_model.safetensors").is_file():
            base, _ = resolve_base_model(base_name)
            torch.manual_seed(100 + i)
            peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO,
                                                         task_type="CAUSAL_LM"))
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.02)
            peft_model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def timed(fn, runs: int, warmup) -> tuple[list[float], object]:
    warmup()
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timed calls of ours (median)")
    parser.add_argument("--peft-runs", type=int, default=1, help="timed calls of PEFT (minutes each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the expert folders go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()

    import peft
    import torch
    import transformers
    from peft import XLoraConfig, get_peft_model

    import moelora
    from moelora.base_models import resolve_base_model

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-xlora-"))
    folders = make_experts(args.base, workdir, args.experts)

    base, _ = resolve_base_model(args.base)
    base.config.use_cache = False  # PEFT's X-LoRA refuses a base model with the cache on
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                  xlora_depth=2, xlora_size=256,
                                                  adapters={str(i): f for i, f in enumerate(folders)})).eval()
    head = {k.split("internal_xlora_classifier.", 1)[1]: v.clone()
            for k, v in theirs.state_dict().items() if "internal_xlora_classifier." in k}

    ours_base, _ = resolve_base_model(args.base)
    cfg = moelora.XLoRAConfig(experts={str(i): f for i, f in enumerate(folders)}, target_modules=QKVO,
                              xlora_depth=2, xlora_size=256)
    ours = moelora.get_moelora_model(ours_base, cfg).eval()
    ours.xlora_classifier.load_state_dict(head)

    gen = torch.Generator().manual_seed(4321)
    prompt = torch.randint(3, base.config.vocab_size, (1, args.prompt_len), generator=gen)
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
    n = args.new_tokens

    def run_ours(tokens=n):
        return ours.generate(**kw, max_new_tokens=tokens, min_new_tokens=tokens)

    def run_peft(tokens=n):
        with torch.no_grad():
            return theirs.generate(**kw, max_new_tokens=tokens, min_new_tokens=tokens)

    ours_times, ours_out = timed(run_ours, args.runs, lambda: run_ours(8))
    peft_times, peft_out = timed(run_peft, args.peft_runs, lambda: run_peft(2))
    ours_s, peft_s = statistics.median(ours_times), statistics.median(peft_times)
    result = {
        "base": args.base, "experts": args.experts, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": n,
        "ours_s": round(ours_s, 3), "peft_s": round(peft_s, 3), "speedup": round(peft_s / ours_s, 2),
        "ours_tokens_per_s": round(n / ours_s, 2), "peft_tokens_per_s": round(n / peft_s, 2),
        "ours_times": [round(t, 3) for t in ours_times], "peft_times": [round(t, 3) for t in peft_times],
        "identical_tokens": bool(torch.equal(ours_out, peft_out)),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "machine": platform.processor() or platform.machine(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"# {args.base}, {args.experts} experts r8 (q,k,v,o), batch 1, prompt {args.prompt_len}, {n} new tokens, "
          f"greedy, {result['threads']} threads, torch {torch.__version__}, peft {peft.__version__}")
    print("| generate | median s | tokens/s | runs (s) |")
    print("|---|---|---|---|")
    print(f"| moelora X-LoRA, two KV caches | {ours_s:.2f} | {n / ours_s:.2f} | {result['ours_times']} |")
    print(f"| PEFT X-LoRA (use_cache=False) | {peft_s:.2f} | {n / peft_s:.2f} | {result['peft_times']} |")
    print(f"speed-up: {peft_s / ours_s:.2f}x; identical tokens: {result['identical_tokens']}; "
          f"1-min load average at the end: {result['loadavg_1min']}")


if __name__ == "__main__":
    main()
