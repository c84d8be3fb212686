#!/usr/bin/env python
"""Training step time and peak memory of every moelora method against its PEFT peer, in one script.

    python benchmarks/bench_train_step.py --json benchmarks/results/train_step.json     # every case
    python benchmarks/bench_train_step.py --cases peft_lora64 smora64_8 --steps 3 --no-memory
    python benchmarks/bench_train_step.py --batches instruction --compile --no-memory   # instruction data, compiled
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --base random-smollm2-135m --seq 512 \
        --backends torch triton --no-memory --json benchmarks/results/h100/train_step_gpu.json  # on a GPU

Time: every case is built in this one process on the same base weights and runs the same batch
(--batches lm: random token ids, batch x seq, labels = inputs; --batches instruction: built-in suite examples,
labels on the response only; the modality case also gets images and speech) with AdamW
over its trainable parameters: zero_grad + forward + backward + step (+ the router update of methods that
have one), as `research/peft-anchors.md` measures PEFT. Cases run interleaved (round robin over the timed
repeats), so drift on a shared machine hits every case alike; medians with min-max, and each ratio is the
case's median over its peer's median (`cases.py`: PEFT LoRA of equal total rank, PEFT X-LoRA for X-LoRA).

Memory: peak RSS cannot be told apart within one process, so each case is first run alone in a child
process (2 steps) and its peak RSS (VmHWM) is reported; the ratio is against its peer's child. On a GPU the
child reports the peak of torch's CUDA allocator instead (weights, activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cases import (CASES, DTYPES, add_device_args, build_case, make_batch, make_instruction_batch,  # noqa: E402
                   machine, peft_xlora_head, sync, trainable)

from moelora.model import MoELoRAModel  # noqa: E402
from moelora.supervised_loss import supervised_positions  # noqa: E402

TRAIN_CASES = [n for n in CASES if n != "base"]
TOKENS: dict[str, int] = {}  # real (non-pad) tokens in each case's batch, for tokens/s


def make_step(model, batch, compiled: bool = False, full_logits: bool = False):
    """One training step of `model` on `batch`. Labels: the batch's own (instruction batches: response only) or
    the inputs. Our methods get the LM head at supervised positions only, as train.py runs them; PEFT full
    logits, as transformers.Trainer runs it. `compiled`: torch.compile (Inductor) on both alike."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    model.train()
    update = getattr(model, "update_router_state", None)
    inputs = dict(batch)
    inputs.setdefault("labels", batch["input_ids"])
    if isinstance(model, MoELoRAModel) and not full_logits:
        inputs["supervised_positions"] = supervised_positions(inputs["labels"].cpu()).to(inputs["labels"].device)
    run = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = run(**inputs).loss
        loss.backward()
        optimizer.step()
        if update is not None:
            update()  # SMoRA's once-per-step bias update is part of its step

    return step


def with_backend(step, backend: str):
    """The step with MOELORA_BACKEND set while it runs (the op reads it at every call)."""
    def run():
        old = os.environ.get("MOELORA_BACKEND")
        os.environ["MOELORA_BACKEND"] = backend
        try:
            step()
        finally:
            if old is None:
                del os.environ["MOELORA_BACKEND"]
            else:
                os.environ["MOELORA_BACKEND"] = old

    return run


def build_all(names, args, workdir):
    """(step functions, trainable counts); PEFT X-LoRA first so ours can copy its classifier."""
    gen = torch.Generator().manual_seed(0)
    head = None
    steps, params = {}, {}
    for name in sorted(names, key=lambda n: n != "peft_xlora"):
        model = build_case(name, args.base, workdir, head, args.device, DTYPES[args.dtype])
        if name == "peft_xlora":
            head = peft_xlora_head(model)
        vocab = model.get_input_embeddings().num_embeddings
        media = getattr(model, "media_tokens", None)
        gen.manual_seed(0)  # every case trains on the same batch
        if args.batches == "instruction":
            batch = make_instruction_batch(name, vocab, args.batch, gen, media, args.device, DTYPES[args.dtype])
        else:
            batch = make_batch(name, vocab, args.batch, args.seq, gen, media, args.device, DTYPES[args.dtype])
        steps[name] = make_step(model, batch, compiled=args.compile, full_logits=args.full_logits)
        TOKENS[name] = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        params[name] = sum(p.numel() for p in trainable(model))
    return steps, params


def peak_memory_mb(device: str) -> float:
    """This process's peak memory in MiB: on a GPU, torch's CUDA allocator peak; else the peak RSS (VmHWM,
    not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a large parent
    would report the parent's peak)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_of(name: str, args, workdir: Path) -> float:
    """Peak memory (MiB) of a child process that builds the case and runs 2 steps."""
    cmd = [sys.executable, __file__, "--child", name, "--base", args.base, "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads), "--workdir", str(workdir),
           "--device", args.device, "--dtype", args.dtype, "--batches", args.batches] + (["--compile"] if args.compile else []) + (["--full-logits"] if args.full_logits else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"memory child for case {name} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--cases", nargs="*", default=TRAIN_CASES, choices=TRAIN_CASES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    add_device_args(parser)
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton"],
                        help="time our methods on each of these op backends (rows NAME@BACKEND) instead of "
                             "MOELORA_BACKEND's choice; triton needs a GPU")
    parser.add_argument("--batches", choices=["lm", "instruction"], default="lm",
                        help="lm: random ids, labels = inputs (batch x seq); instruction: the built-in suite's "
                             "examples, labels on the response only (--seq unused)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every case (ours and PEFT's)")
    parser.add_argument("--full-logits", action="store_true",
                        help="our methods too compute logits at every position (train.py's logits_on_supervised_only=false)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case child processes")
    parser.add_argument("--memory-only", action="store_true", help="only the per-case child processes")
    parser.add_argument("--workdir", default=None, help="X-LoRA expert folders (default: a temp dir)")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))

    if args.child:  # one case alone, for its peak memory
        steps, _ = build_all([args.child], args, workdir)  # X-LoRA: its own classifier init, same size
        for _ in range(2):  # the optimizer state exists after the first step; the second is steady state
            steps[args.child]()
        print(peak_memory_mb(args.device))
        return

    names = list(dict.fromkeys(args.cases + [CASES[n].peer for n in args.cases if CASES[n].peer]))
    mem_label = "peak CUDA MiB" if torch.device(args.device).type == "cuda" else "peak RSS MiB"
    memory = {} if args.no_memory else {name: memory_of(name, args, workdir) for name in names}
    if args.memory_only:
        print(f"| case | peer | {mem_label} | memory vs peer |\n|---|---|---:|---:|")
        for name in names:
            peer = CASES[name].peer
            print(f"| {name} | {peer or '–'} | {memory[name]:.0f} | {f'{memory[name] / memory[peer]:.2f}x' if peer else '–'} |")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"args": vars(args), "peak_rss_mib": memory}, indent=2))
        return
    steps, params = build_all(names, args, workdir)
    if args.backends:
        for name in [n for n in names if CASES[n].kind == "moelora"]:
            step, count = steps.pop(name), params.pop(name)
            for backend in args.backends:
                steps[f"{name}@{backend}"], params[f"{name}@{backend}"] = with_backend(step, backend), count
        names = list(steps)
    for name in names:
        for _ in range(args.warmup):
            steps[name]()
    sync(args.device)
    times = {name: [] for name in names}
    for _ in range(args.steps):  # round robin: drift on a shared machine hits every case alike
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
        gc.collect()

    shape = (f"batch {args.batch} x seq {args.seq} (labels = inputs)" if args.batches == "lm" else
             f"{args.batch} built-in-suite examples (labels on the response)")
    header = (f"{machine(args)}, torch {torch.__version__}, {args.dtype}, {'compiled, ' if args.compile else ''}"
              f"{'ours with full logits, ' if args.full_logits else ''}"
              f"{args.base}, {shape}, median of {args.steps} after {args.warmup} warm-up, "
              f"1-min load average {os.getloadavg()[0]:.2f} at the end")
    print("# " + header)
    print(f"| case | peer | trainable | median s/step | min-max s | tokens/s | time vs peer | {mem_label} "
          "| memory vs peer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        peer = CASES[name.split("@")[0]].peer
        ratio = med / statistics.median(times[peer]) if peer else None
        mem = memory.get(name)
        mem_ratio = mem / memory[peer] if peer and mem else None
        rows[name] = {"median_s": med, "times_s": times[name], "trainable": params[name], "peer": peer,
                      "time_ratio": ratio, "peak_rss_mib": mem, "rss_ratio": mem_ratio}
        print(f"| {name} | {peer or '–'} | {params[name]:,} | {med:.4f} | {min(times[name]):.4f}-{max(times[name]):.4f} "
              f"| {TOKENS[name.split('@')[0]] / med:.0f} | {f'{ratio:.2f}x' if ratio else '–'} | {f'{mem:.0f}' if mem else '–'} "
              f"| {f'{mem_ratio:.2f}x' if mem_ratio else '–'} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
