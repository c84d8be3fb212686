"""Count what a training step asks of the host: aten ops dispatched, and the ones that would wait for a GPU.

    python benchmarks/host_ops.py                                # every case, SmolLM2-135M shape, 1 x 64 tokens
    python benchmarks/host_ops.py --cases smora64_8 peft_lora64 --base tiny-random-llama
    python benchmarks/host_ops.py --train-loop --accum 4                # train.py's own loop, per optimizer step

On a GPU a small model's step is bound by the host issuing kernels (benchmarks/RESULTS.md §5), and worse
still by host syncs: an op whose result the host must read (`.item()`, `bool(t)`, `torch.equal`, boolean-mask
indexing, `bincount`, `nonzero`) stops the host until the GPU has drained its queue, so launches stop
overlapping the GPU's work. Both can be counted on a CPU, where nothing is timed: a TorchDispatchMode sees every
aten op of the forward and backward. `HostOpCounter` is also what the tests use to keep the
adapter layers free of syncs.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that make the host wait for the device: a scalar read, or an output whose size depends on the data.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.equal, aten.bincount, aten.masked_select, aten.unique_dim,
            aten._unique2, aten.unique_consecutive, aten.nonzero_static}


def _bool_index(args) -> bool:
    """x[mask] / x[mask] = v: a boolean index is turned into positions with nonzero (a sync on a GPU)."""
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and torch.is_tensor(t) and t.dtype == torch.bool for t in indices)


class HostOpCounter(TorchDispatchMode):
    """Counts aten ops and host syncs (by op name) while active. With trace=True, `where[name]` counts the
    source lines outside torch that issued each kind of sync."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.ops = 0
        self.syncs: collections.Counter = collections.Counter()
        self.where: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        packet = func.overloadpacket
        if packet in SYNC_OPS or (packet in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args)):
            name = str(packet).replace("aten.", "")
            self.syncs[name] += 1
            if self.trace:
                self.where[name][_caller()] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if "/torch/" in name or name.endswith("host_ops.py"):  # the innermost caller outside torch
            continue
        return f"{Path(name).name}:{frame.lineno}"
    return "?"


TRAIN_LOOP_ARGS = [  # a tiny SMoRA run of train.py: no evaluation, no checkpoints, metrics only at the last step
    "base_model=tiny-random-llama", "data.tasks=[add, reverse_word]", "data.n_train_per_task=64",
    "data.n_eval_per_task=0", "eval_before_training=false", "eval_strategy=no", "data.max_length=64",
    "per_device_train_batch_size=2", "report_to=[jsonl]", "logging_steps=1000000",
    "method={name: smora, r: 8, k: 2, alpha: 4}",
]


def train_loop_syncs(script: Path, steps: int, accum: int) -> tuple[collections.Counter, int]:
    """Host syncs of one optimizer step of `script`'s loop (train.py, or an older copy of it), by the source
    line that issued each, and the micro-batches per step: the counts of a run of 2*steps steps less those of
    a run of `steps` steps (setup, the last step's metrics and the final save cancel), divided by `steps`."""
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("train_under_count", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    by_line = []
    for n in (steps, 2 * steps):
        out = Path(tempfile.mkdtemp(prefix="host-ops-train-"))
        with HostOpCounter(trace=True) as counter:
            module.main([*TRAIN_LOOP_ARGS, f"max_steps={n}", f"gradient_accumulation_steps={accum}",
                         f"output_dir={out}"])
        by_line.append(collections.Counter({where: k for where_by_op in counter.where.values()
                                            for where, k in where_by_op.items()}))
    per_step = by_line[1]
    per_step.subtract(by_line[0])
    return collections.Counter({w: k / steps for w, k in per_step.items() if k}), accum


def main_train_loop(args):
    scripts = [Path(args.train_script)] + ([Path(args.compare)] if args.compare else [])
    print(f"# host syncs per optimizer step of a training script's loop ({args.accum} micro-batches per step; "
          "tiny-random-llama SMoRA on CPU, where every scalar read is counted: those of the host batch wait for no GPU)")
    print("| script | host syncs per step | by source line |")
    print("|---|---:|---|")
    for script in scripts:
        per_step, _ = train_loop_syncs(script, args.steps, args.accum)
        lines = ", ".join(f"{w}: {k:g}" for w, k in sorted(per_step.items(), key=lambda kv: -kv[1]))
        print(f"| {script.name} | {sum(per_step.values()):g} | {lines} |", flush=True)


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    from cases import CASES, build_case, make_batch, peft_xlora_head, trainable

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="random-smollm2-135m")
    p.add_argument("--cases", nargs="*", default=[n for n in CASES if n != "base"], choices=list(CASES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--trace", action="store_true", help="print where each kind of sync comes from")
    p.add_argument("--train-loop", action="store_true",
                   help="count train.py's training loop instead (whole optimizer steps, by source line)")
    p.add_argument("--train-script", default=str(Path(__file__).resolve().parents[1] / "train.py"),
                   help="with --train-loop: the script to count")
    p.add_argument("--compare", default=None, help="with --train-loop: a second script (e.g. an older train.py)")
    p.add_argument("--accum", type=int, default=4, help="with --train-loop: gradient_accumulation_steps")
    p.add_argument("--steps", type=int, default=2, help="with --train-loop: steps counted (runs of N and 2N)")
    args = p.parse_args(argv)
    if args.train_loop:
        return main_train_loop(args)
    workdir = Path(tempfile.mkdtemp(prefix="host-ops-"))
    names = sorted(args.cases, key=lambda n: n != "peft_xlora")
    head = None
    print(f"# {args.base}, batch {args.batch} x seq {args.seq}: the forward and backward of one training step, "
          "after one warm-up step (the optimizer step is left out: its scalar reads are of CPU tensors)")
    print("| case | peer | aten ops | ops vs peer | host syncs | syncs by op |")
    print("|---|---|---:|---:|---:|---|")
    counts = {}
    for name in names:
        model = build_case(name, args.base, workdir, head)
        if name == "peft_xlora":
            head = peft_xlora_head(model)
        batch = make_batch(name, model.get_input_embeddings().num_embeddings, args.batch, args.seq,
                           torch.Generator().manual_seed(0), getattr(model, "media_tokens", None))
        model.train()
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        update = getattr(model, "update_router_state", None)
        for counting in (False, True):  # a warm-up step, then the counted one
            optimizer.zero_grad(set_to_none=True)
            with HostOpCounter(trace=args.trace) if counting else torch.enable_grad() as counter:
                model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            if update is not None:
                update()
        counts[name] = counter
        peer = CASES[name].peer
        ratio = f"{counter.ops / counts[peer].ops:.2f}x" if peer in counts else "–"
        print(f"| {name} | {peer or '–'} | {counter.ops} | {ratio} | {counter.total_syncs} | "
              f"{dict(counter.syncs.most_common())} |", flush=True)
        if args.trace:
            for op, where in counter.where.items():
                print(f"    {op}: {dict(where.most_common(6))}")


if __name__ == "__main__":
    main()
