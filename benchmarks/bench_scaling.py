#!/usr/bin/env python
"""Data-parallel scaling on CPU: training tokens/s of train.py with 1 process vs 2 processes (gloo).

    python benchmarks/bench_scaling.py --json benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --config configs/lora.yaml --steps 12
    python benchmarks/bench_scaling.py --set ddp_comm_hook=fp16      # train.py overrides for every run

Runs `accelerate launch train.py` on the same config, per-process batch and data: 1 process x 1 thread
(one core: the unit that data parallelism replicates), 1 process x 2 threads (the default on a 2-core
machine), 2 processes x 1 thread (data parallel, DDP over gloo), and two unrelated 1-thread runs at the same
time (no communication: the most two cores give this workload, the ceiling for data parallel). tokens/s is train.py's
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

RUNS = {  # name -> (processes, threads per process, independent copies run at the same time)
    "1 process x 1 thread": (1, 1, 1),
    "1 process x 2 threads": (1, 2, 1),
    "2 processes x 1 thread": (2, 1, 1),
    # Two unrelated 1-thread runs side by side: no communication at all, so their summed tokens/s is what
    # this machine's two cores give this workload (shared memory bandwidth and L3): data parallel's ceiling.
    "2 independent 1-thread runs (ceiling)": (1, 1, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(processes: int, threads: int, args, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    if processes > 1:
        cmd.append("--multi_gpu")  # with train.py's Accelerator(cpu=True): CPU processes over gloo
    cmd += [str(REPO / "train.py"), "--config", args.config, f"base_model={args.base}", f"max_steps={args.steps}",
            f"logging_steps={args.window}", f"per_device_train_batch_size={args.batch}", f"num_threads={threads}",
            "eval_before_training=false", "eval_strategy=no", "save_steps=0", "report_to=[jsonl]",
            f"output_dir={out}", *args.set]
    return cmd


def run(processes: int, threads: int, copies: int, args, out: Path) -> list[float]:
    """tokens/s per logging window (the warm-up window dropped), summed over the copies run side by side."""
    procs = [subprocess.Popen(launch_cmd(processes, threads, args, out / f"copy{i}"), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(copies)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"train.py failed:\n{err[-2000:]}")
    windows = []
    for i in range(copies):
        log = [json.loads(line) for line in (out / f"copy{i}" / "log.jsonl").read_text().splitlines()]
        windows.append([r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:])
    return [sum(w) for w in zip(*windows)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/smora.yaml")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=4, help="logging window (steps)")
    parser.add_argument("--batch", type=int, default=8, help="per-process batch")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more train.py overrides")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for name, (processes, threads, copies) in RUNS.items():
            windows = run(processes, threads, copies, args, Path(tmp) / f"run{len(results)}")
            results[name] = {"processes": processes, "threads": threads, "copies": copies, "tokens_per_s": windows,
                             "median": statistics.median(windows)}
    unit = results["1 process x 1 thread"]["median"]
    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.config}, {args.base}, "
              f"per-process batch {args.batch}, {args.steps} steps (windows of {args.window}, first dropped), "
              f"overrides {args.set or 'none'}, "
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
