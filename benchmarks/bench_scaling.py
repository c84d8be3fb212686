#!/usr/bin/env python
"""Data-parallel scaling on CPU: training tokens/s of train.py with 1 process vs 2 processes (gloo).

    python benchmarks/bench_scaling.py --json benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --config configs/lora.yaml --steps 12

Runs `accelerate launch train.py` three times on the same config, per-process batch and data:
1 process x 1 thread (one core: the unit that data parallelism replicates), 1 process x 2 threads (the
default on a 2-core machine), 2 processes x 1 thread (data parallel, DDP over gloo). tokens/s is train.py's
own logged figure (all processes' tokens over wall time); the first logging window (warm-up) is dropped and
the median of the others is reported. Ratios are against the 1 process x 1 thread run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS = {  # name -> (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, threads: int, args, out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    if processes > 1:
        cmd.append("--multi_gpu")  # with train.py's Accelerator(cpu=True): CPU processes over gloo
    cmd += [str(REPO / "train.py"), "--config", args.config, f"base_model={args.base}", f"max_steps={args.steps}",
            f"logging_steps={args.window}", f"per_device_train_batch_size={args.batch}", f"num_threads={threads}",
            "eval_before_training=false", "eval_strategy=no", "save_steps=0", "report_to=[jsonl]",
            f"output_dir={out}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]  # drop the warm-up window


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/smora.yaml")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=4, help="logging window (steps)")
    parser.add_argument("--batch", type=int, default=8, help="per-process batch")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for name, (processes, threads) in RUNS.items():
            windows = run(processes, threads, args, Path(tmp) / name.replace(" ", "_"))
            results[name] = {"processes": processes, "threads": threads, "tokens_per_s": windows,
                             "median": statistics.median(windows)}
    unit = results["1 process x 1 thread"]["median"]
    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.config}, {args.base}, "
              f"per-process batch {args.batch}, {args.steps} steps (windows of {args.window}, first dropped), "
              f"1-min load average {os.getloadavg()[0]:.2f} at the end")
    print("# " + header)
    print("| run | tokens/s (median) | windows | vs 1 process x 1 thread |")
    print("|---|---:|---|---:|")
    for name, r in results.items():
        r["ratio"] = r["median"] / unit
        print(f"| {name} | {r['median']:.0f} | {[round(w) for w in r['tokens_per_s']]} | {r['ratio']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "args": vars(args), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
