#!/usr/bin/env python
"""Score checkpoints (and the base model alone) on the tasks they were trained on, and compare them.

    python evaluate.py --checkpoint model_cards/smora-64-8 model_cards/lora-8           # + the base model
    python evaluate.py --checkpoint model_cards/modality model_cards/mixlora --out eval/multimodal
    python evaluate.py --checkpoint runs/smora/adapter --tasks add sort_asc --limit-per-task 8
    python evaluate.py --checkpoint runs/mine/adapter --eval-files my_eval.jsonl --tasks none
    accelerate launch --num_processes 2 evaluate.py --checkpoint ...      # the tasks are split over processes

The story: arguments -> which tasks (the checkpoints' own: the built-in tasks and eval files of their
training_config, unless --tasks / --eval-files; every task of a suite for checkpoints without one) ->
the held-out examples (the same for every model) -> for the base and then each checkpoint: load it, score
this process's share of the tasks one task at a time, gather -> write the results and the comparison.

Written under --out (default eval_results/):
  <name>/results.md, <name>/results.json   per-task exact match, eval loss / perplexity, every prediction
  <name>/routing.json                      routers' load per task and layer (methods with a learned router)
  <name>/router_load.png                   per-layer expert/rank load over all tasks
  <name>/task_routing.png                  per-task routing heatmap (load averaged over layers)
  comparison.md, comparison.json           one table: tasks x models
Multimodal tasks need a checkpoint with image/audio encoders; other models show "–" for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    # --- 1. arguments and the checkpoints' own records (method, base model, how they were trained) ---
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from moelora.checkpoint import read_json
    from moelora.model import MANIFEST_NAME
    from moelora.eval_suite import load_eval_examples, macro_average, needs_media, suite_task_names

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after all the scoring
        raise_error("--out", f"{out} is a file; --out names the folder the results go to")
    checkpoints = [Path(c) for c in args.checkpoint]
    manifests = [read_manifest(c, MANIFEST_NAME, read_json) for c in checkpoints]
    names = ([] if args.no_base else ["base"]) + [checkpoint_name(c) for c in checkpoints]
    if len(set(names)) != len(names):
        raise_error("--checkpoint", f"two models would share a name in the tables: {names}; give folders "
                    "distinct names (a folder called 'adapter' is named after its parent)")
    # (a hand-edited manifest may hold anything: only objects are read as training configs)
    trained_with = [t if isinstance(t := m.get("training_config"), dict) else {} for m in manifests]
    trained_with = [{**t, "data": t["data"] if isinstance(t.get("data"), dict) else {}} for t in trained_with]
    base_id = args.base_model or next((m["base_model"] for m in manifests if isinstance(m.get("base_model"), str)
                                       and m["base_model"]), None)
    if base_id is None:
        raise_error("--base-model", "no checkpoint names its base model; pass --base-model")

    # --- 2. processes: each scores a share of the tasks; one writes ---------------------------------
    state = make_state()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))  # share the cores

    # --- 3. which tasks, and their held-out examples (identical for every model) ---------------------
    suites = [args.suite] if args.suite != "auto" else list(dict.fromkeys(
        t.get("data", {}).get("suite", "text") for t in trained_with)) or ["text"]
    tasks = (own_tasks(trained_with, suites, suite_task_names) if args.tasks is None
             else [] if args.tasks == ["none"] else args.tasks)
    data = trained_with[0].get("data", {}) if trained_with else {}
    if args.eval_files is None:  # the checkpoints' own held-out files (pass --eval-files with none to skip them)
        args.eval_files = own_eval_files(trained_with)
    task_field = args.task_field or data.get("task_field") or "task"
    default_task = data.get("default_task") or "default"
    max_length = data.get("max_length") if isinstance(data.get("max_length"), int) else 256
    seed = args.seed if args.seed is not None else trained_with[0].get("seed", 42) if trained_with else 42
    n_eval = args.n_eval_per_task or data.get("n_eval_per_task", 32)
    examples = load_eval_examples(tasks, n_eval, seed, args.eval_files, task_field, default_task)
    if args.limit_per_task:
        examples = {t: exs[: args.limit_per_task] for t, exs in examples.items()}
    settings = {"seed": seed, "n_eval_per_task": n_eval, "limit_per_task": args.limit_per_task,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "tasks": list(examples),
                "eval_files": [str(f) for f in args.eval_files], "base_model": base_id}

    # --- 4. score the base and every checkpoint, task by task ----------------------------------------
    mine = list(examples)[state.process_index :: state.num_processes]
    bar = tqdm(total=len(names) * len(mine), desc="evaluate", unit="task", disable=not state.is_main_process)
    results = {}
    try:  # the bar is closed before any error line is printed
        for name, path in zip(names, ([None] if not args.no_base else []) + checkpoints):
            model, tokenizer = load_model(path, base_id, args.allow_non_finite)
            can_see_media = getattr(model, "media_tokens", None) is not None
            share = {t: examples[t] for t in mine if can_see_media or not needs_media(t)}
            part = score(model, tokenizer, share, args, bar, name, max_length)
            results[name] = merge(gather(state, part), list(examples))
            results[name].update(checkpoint=str(path) if path else None, base_model=base_id,
                                 method=getattr(getattr(model, "method_config", None), "method_name", "none"),
                                 expert_names=expert_names(model))
            del model
    finally:
        bar.close()

    # --- 5. write per-model results, plots and the comparison ----------------------------------------
    if state.is_main_process:
        for name, res in results.items():
            res["average"] = macro_average(res["per_task"])
            res.update(eval_loss_fields(res.pop("loss_sums")))
            write_model_results(out / name, name, res, settings, plots=not args.no_plots)
        common = [t for t in examples if all(t in r["per_task"] for r in results.values())]
        table = comparison_table(results, common)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table + "\n")
        (out / "comparison.json").write_text(json.dumps(
            {"settings": settings, "common_tasks": common,
             "models": {n: {k: r[k] for k in ("checkpoint", "method", "per_task", "n", "average", "loss", "perplexity",
                                              "loss_per_task")}
                        for n, r in results.items()}}, indent=2) + "\n")
        print("\nexact match (%) on the held-out split:\n" + table)
        print(f"\nresults written to {out}/")
    state.wait_for_everyone()
    return results


# --- helpers: each one step of the story above ---------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", default=[], help="adapter folders (moelora or PEFT LoRA)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task names (default: every task of the checkpoints' training suites); 'none' "
                             "with --eval-files scores only your own data")
    parser.add_argument("--suite", default="auto", choices=["auto", "text", "multimodal"],
                        help="built-in suite whose tasks are scored (auto: the checkpoints' training suites)")
    parser.add_argument("--eval-files", nargs="*", default=None,
                        help="your own JSONL/Parquet held-out files (default: the checkpoints' data.eval_files; "
                             "give the flag with no file to score none)")
    parser.add_argument("--task-field", default=None,
                        help="column naming each row's task in --eval-files (default: the checkpoint's, or 'task')")
    parser.add_argument("--n-eval-per-task", type=int, default=0,
                        help="held-out examples per built-in task (default: as the first checkpoint was trained, or 32)")
    parser.add_argument("--seed", type=int, default=None, help="held-out split seed (default: the first checkpoint's)")
    parser.add_argument("--limit-per-task", type=int, default=0, help="score only the first N examples per task")
    parser.add_argument("--batch-size", type=int, default=64, help="generation batch (per task)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="the longest built-in answer is < 12 tokens")
    parser.add_argument("--base-model", default=None, help="base model id (default: from the checkpoints' manifests)")
    parser.add_argument("--no-base", action="store_true", help="do not score the base model alone")
    parser.add_argument("--no-plots", action="store_true", help="skip the router-utilisation PNGs")
    parser.add_argument("--out", default="eval_results", help="output folder")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="load adapters holding NaN/inf weights anyway (to inspect a diverged run)")
    args = parser.parse_args(argv)
    if not args.checkpoint and args.no_base:
        parser.error("nothing to evaluate: give --checkpoint folders, or drop --no-base to score the base model")
    if args.limit_per_task < 0 or args.n_eval_per_task < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--limit-per-task and --n-eval-per-task must be >= 0, --batch-size and --max-new-tokens >= 1")
    return args


def raise_error(key: str, message: str):
    from moelora.errors import ConfigError

    raise ConfigError(key, message)


def read_manifest(folder: Path, manifest_name: str, read_json) -> dict:
    from moelora.errors import CheckpointError

    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    return read_json(folder / manifest_name, "manifest") if (folder / manifest_name).is_file() else {}


def checkpoint_name(folder: Path) -> str:
    folder = folder.resolve()
    return folder.parent.name if folder.name == "adapter" else folder.name


def make_state():
    """accelerate's process state: one process, or `accelerate launch`'s (gloo on CPU-only machines)."""
    import torch
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return PartialState(cpu=True, backend="gloo")
    return PartialState()


def load_model(path: Path | None, base_id: str, allow_non_finite: bool = False):
    """(model, tokenizer): the plain base model for `path=None`, else the adapter on a fresh base."""
    import moelora
    from moelora.base_models import resolve_base_model

    base, tokenizer = resolve_base_model(base_id)
    if path is None:
        base.eval()
        return base, tokenizer
    return moelora.MoELoRAModel.from_pretrained(base, path, base_model_id=base_id,
                                                allow_non_finite=allow_non_finite), tokenizer


def own_tasks(trained_with: list[dict], suites: list[str], suite_task_names) -> list[str]:
    """The built-in tasks the checkpoints were trained on (their training_config's data.tasks: "all" = the
    suite's tasks, a list, or "none"), in first-seen order; a checkpoint without a training_config (e.g. a
    PEFT folder) brings every task of the suites."""
    tasks: list[str] = []
    for cfg in trained_with or [{}]:
        data = cfg.get("data") or {}
        recorded = "tasks" in data
        chosen = data["tasks"] if recorded else "all"
        suite = [data.get("suite", "text")] if recorded else suites
        if chosen == "all" or chosen == "auto":  # "auto" is resolved when saved; an old manifest may hold it
            chosen = [t for s in suite for t in suite_task_names(s)]
        elif not isinstance(chosen, list):
            chosen = []
        tasks += [t for t in chosen if isinstance(t, str) and t not in tasks]
    return tasks


def own_eval_files(trained_with: list[dict]) -> list[str]:
    """The checkpoints' data.eval_files (each once); a file no longer there is an error naming it."""
    files: list[str] = []
    for cfg in trained_with:
        listed = cfg.get("data", {}).get("eval_files") or []
        files += [f for f in listed if isinstance(f, str) and f not in files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise_error("--eval-files", f"the checkpoint was trained with eval file {missing[0]}, which is not found "
                    "here; pass --eval-files with its new path (or with no file to skip it)")
    return files


def score(model, tokenizer, examples_by_task: dict, args, bar, name: str, max_length: int = 256) -> dict:
    """Exact match per task (`evaluate_tasks`) plus training's loss on the text tasks' examples."""
    from moelora.eval_suite import evaluate_tasks, needs_media
    from moelora.evaluation import evaluate_loss

    def done(task):
        bar.set_postfix(model=name, task=task)
        bar.update(1)

    part = evaluate_tasks(model, tokenizer, examples_by_task, args.batch_size, args.max_new_tokens,
                          on_task_done=done)
    text = [ex for t, exs in examples_by_task.items() if not needs_media(t) for ex in exs]
    # A smaller batch than generation's: a plain base model computes logits at every position.
    part["loss_sums"] = evaluate_loss(model, tokenizer, text, min(args.batch_size, 8), max_length)["sums"] if text else {}
    return part


def eval_loss_fields(sums: dict) -> dict:
    """loss / perplexity over every scored text task's response tokens, and the loss per task (None: none)."""
    from moelora.evaluation import loss_summary

    if not sums:
        return {"loss": None, "perplexity": None, "loss_per_task": {}}
    summary = loss_summary(sums)
    return {"loss": summary["loss"], "perplexity": summary["perplexity"], "loss_per_task": summary["per_task"]}


def gather(state, part: dict) -> list[dict]:
    if state.num_processes == 1:
        return [part]
    from accelerate.utils import gather_object

    return gather_object([part])


def merge(parts: list[dict], task_order: list[str]) -> dict:
    """One result from every process's share, tasks back in table order."""
    per_task, n, routing, predictions, loss_sums = {}, {}, {}, [], {}
    for p in parts:
        loss_sums |= p.get("loss_sums", {})
        per_task |= p["per_task"]
        n |= p["n"]
        routing |= p["routing"]
        predictions += p["predictions"]
    rank = {t: i for i, t in enumerate(task_order)}
    predictions.sort(key=lambda p: (rank.get(p["task"], len(rank)), p["index"]))
    ordered = [t for t in task_order if t in per_task]
    return {"per_task": {t: per_task[t] for t in ordered}, "n": {t: n[t] for t in ordered},
            "predictions": predictions, "routing": {t: routing[t] for t in ordered if t in routing},
            "loss_sums": {t: loss_sums[t] for t in ordered if t in loss_sums}}


def expert_names(model) -> list[str] | None:
    experts = getattr(getattr(model, "method_config", None), "experts", None)
    return list(experts) if isinstance(experts, dict) else None


def write_model_results(folder: Path, name: str, res: dict, settings: dict, plots: bool) -> None:
    from moelora.evaluation import format_results_table
    from moelora.plots import plot_layer_load, plot_task_routing

    folder.mkdir(parents=True, exist_ok=True)
    keep = ("checkpoint", "base_model", "method", "per_task", "n", "average", "loss", "perplexity", "loss_per_task",
            "predictions")
    (folder / "results.json").write_text(json.dumps({"name": name, "settings": settings,
                                                     **{k: res[k] for k in keep}}, indent=1) + "\n")
    table = format_results_table({name: res})
    (folder / "results.md").write_text(f"# {name}: exact match (%) per task\n\n{table}\n\n"
                                       f"{sum(res['n'].values())} held-out examples, seed {settings['seed']}, "
                                       f"greedy decoding, up to {settings['max_new_tokens']} new tokens.\n")
    if res["routing"]:
        (folder / "routing.json").write_text(json.dumps(
            {"expert_names": res["expert_names"],
             "per_task": {t: {layer: [round(x, 5) for x in load] for layer, load in per_layer.items()}
                          for t, per_layer in res["routing"].items()}}) + "\n")
        if plots:
            plot_layer_load(res["routing"], folder / "router_load.png", name, res["expert_names"])
            plot_task_routing(res["routing"], folder / "task_routing.png", name, res["expert_names"])


def comparison_table(results: dict, common: list[str]) -> str:
    from moelora.eval_suite import macro_average
    from moelora.evaluation import format_results_table

    table = format_results_table(results)
    all_tasks = {t for r in results.values() for t in r["per_task"]}
    if common and len(common) < len(all_tasks):  # models scored on different task sets: add a fair average
        cells = " | ".join(f"{100 * macro_average(r['per_task'], common):.1f}" for r in results.values())
        table += f"\n| average over the {len(common)} tasks every model was scored on | {cells} |"
    return table


def cli(argv: list[str] | None = None) -> int:
    from moelora.errors import run_cli

    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
