"""What `evaluate.py` runs: held-out examples of named tasks, scored task by task, with each task's routing.

Tasks come from the built-in suites (text, multimodal) or from user files. The held-out split of a built-in
task depends only on ``(seed, n_eval_per_task)`` (see `moelora.data.tasks.build_task_suite`), so every
checkpoint of a comparison is scored on the same examples whatever it was trained with. Each task is
generated in its own batches, which makes a task's result independent of which other tasks run with it
(and of how tasks are split over processes), and lets the routers' load be read per task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .data.multimodal import DEFAULT_TEXT_TASKS, MEDIA_TASKS, MULTIMODAL_TASKS
from .data.tasks import TASKS
from .errors import DataError
from .evaluation import evaluate_exact_match

SUITES = ("text", "multimodal")


def suite_task_names(suite: str) -> list[str]:
    """Every task of a built-in suite, in table order."""
    if suite == "text":
        return list(TASKS)
    if suite == "multimodal":
        return list(MULTIMODAL_TASKS) + list(DEFAULT_TEXT_TASKS)
    raise DataError(f"unknown suite '{suite}'; expected one of {', '.join(SUITES)}")


def needs_media(task: str) -> bool:
    return task in MEDIA_TASKS


def load_eval_examples(tasks: Sequence[str], n_eval_per_task: int, seed: int,
                       eval_files: Sequence[str | Path] = (), task_field: str = "task",
                       default_task: str = "default") -> dict[str, list[dict]]:
    """``{task: held-out examples}``: built-in tasks generated, user files read (grouped by their task field)."""
    from .data.multimodal import build_multimodal_suite
    from .data.tasks import build_task_suite, resolve_task_names
    from .data.user_data import load_user_data

    text = [t for t in tasks if t in TASKS]
    media = [t for t in tasks if t in MEDIA_TASKS]
    unknown = [t for t in tasks if t not in TASKS and t not in MEDIA_TASKS]
    if unknown:
        resolve_task_names(unknown)  # raises with a "did you mean" for the first unknown name
    examples = []
    if text:
        examples += build_task_suite(text, 0, n_eval_per_task, seed)[1]
    if media:
        examples += build_multimodal_suite(media, 0, n_eval_per_task, seed)[1]
    if eval_files:
        examples += load_user_data(list(eval_files), task_field=task_field, default_task=default_task)
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex.get("task", ""), []).append(ex)
    if not by_task:
        raise DataError("nothing to evaluate: no tasks selected and no eval files given")
    order = list(tasks) + [t for t in by_task if t not in tasks]  # built-in tasks first, in the asked order
    return {t: by_task[t] for t in order if t in by_task}


def evaluate_tasks(model, tokenizer, examples_by_task: dict[str, list[dict]], batch_size: int = 64,
                   max_new_tokens: int = 12, progress: bool = False, on_task_done=None) -> dict:
    """Exact match per task, with every prediction and (for routed methods) the routers' load per task.

    Returns ``{"per_task", "n", "predictions": [{task, index, instruction, target, prediction, correct}],
    "routing": {task: {layer: [load fraction per expert/rank]}}}`` ("routing" is empty for methods without
    a learned router, e.g. plain LoRA or modality routing). `on_task_done(task)` is called after each task."""
    stats_of = getattr(model, "router_stats", None)
    reset = getattr(model, "reset_router_stats", None)
    per_task, n, predictions, routing = {}, {}, [], {}
    for task, examples in examples_by_task.items():
        if reset is not None:
            reset()
        res = evaluate_exact_match(model, tokenizer, examples, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress)
        per_task[task], n[task] = res["per_task"][task], res["n"][task]
        for i, p in enumerate(res["predictions"]):
            predictions.append({**p, "index": i, "correct": p["prediction"] == p["target"]})
        stats = stats_of() if stats_of is not None else {}
        if stats:
            routing[task] = {layer: s["load"] for layer, s in stats.items()}
        if on_task_done is not None:
            on_task_done(task)
    return {"per_task": per_task, "n": n, "predictions": predictions, "routing": routing}


def macro_average(per_task: dict[str, float], tasks: Sequence[str] | None = None) -> float | None:
    """Mean exact match over `tasks` (default: all of `per_task`); None when one of them is missing."""
    tasks = list(per_task) if tasks is None else list(tasks)
    if not tasks or any(t not in per_task for t in tasks):
        return None
    return sum(per_task[t] for t in tasks) / len(tasks)
