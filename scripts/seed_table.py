#!/usr/bin/env python
"""Tables with a spread from the runs of scripts/seed_runs.sh (issue 18).

    python scripts/seed_table.py runs/seeds benchmarks/results/seeds --baseline lora-8 --out benchmarks/results/seeds_text.md

Reads <root>/<seed>/<name>/eval/<name>/results.json (evaluate.py) and routing.json, and the records
<root>/<seed>/<name>.json that --record writes (what a run's scores need, a few KB, kept in the repository:
runs/ is local to one checkout, so a later session's table still counts the earlier sessions' seeds), and writes:
  * per method: average exact match over the seeds, mean ± sample standard deviation, and each seed's value;
  * per task: mean ± sd per method;
  * paired differences against --baseline (the runs of one seed share data, order and held-out examples), with
    a verdict that calls a difference only when its mean exceeds its own spread (sd of the per-seed differences)
    and every seed agrees in sign; otherwise "within spread";
  * dead ranks/experts: those with zero load on every held-out token of every task (routing.json), per layer
    on average, for methods that route;
  * with --json, the same numbers as data (summary()), for the model cards; an existing file keeps the entries
    of methods this table does not hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def record(results: dict, routing: dict | None) -> dict:
    """What the tables need of one scored run: the scores as evaluate.py stores them (fractions) and, for a run
    that routes, each layer's load summed over the tasks (an expert is dead when that sum is zero)."""
    total = None
    if routing:
        total = {}
        for per_layer in routing["per_task"].values():
            for layer, load in per_layer.items():
                total[layer] = [a + x for a, x in zip(total.get(layer, [0.0] * len(load)), load)]
    return {"average": results["average"], "per_task": results["per_task"], "load_over_tasks": total}


def scored_runs(root: Path):
    """(name, seed, record) for every run folder and every record file under root."""
    for res in sorted(root.glob("*/*/eval/*/results.json")):
        routing = res.parent / "routing.json"
        yield res.parent.name, int(res.parents[3].name), record(
            json.loads(res.read_text()), json.loads(routing.read_text()) if routing.exists() else None)
    for rec in sorted(root.glob("*/*.json")):
        if rec.parent.name.isdigit():
            yield rec.stem, int(rec.parent.name), json.loads(rec.read_text())


def load_runs(*roots: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: {"average", "per_task" in percent, "load_over_tasks", "record"}}}; a run found
    both as a folder and as a record is one run (the record is a copy of the folder's scores)."""
    runs: dict[str, dict[int, dict]] = {}
    for root in roots:
        for name, seed, rec in scored_runs(root):
            runs.setdefault(name, {})[seed] = {  # evaluate.py stores fractions; the tables show percent
                "average": rec["average"] * 100, "per_task": {t: v * 100 for t, v in rec["per_task"].items()},
                "load_over_tasks": rec["load_over_tasks"], "record": rec}
    return runs


def write_records(runs: dict[str, dict[int, dict]], folder: Path):
    for name, by_seed in runs.items():
        for seed, data in by_seed.items():
            path = folder / str(seed) / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data["record"], indent=1) + "\n")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float]) -> str:
    m, s = mean_sd(values)
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def dead_per_layer(load_over_tasks: dict | None) -> float | None:
    """Mean over layers of the experts with zero load on every task's held-out tokens (record()'s sums)."""
    if not load_over_tasks:
        return None
    return statistics.fmean(sum(1 for x in load if x == 0) for load in load_over_tasks.values())


def dead_values(by_seed: dict[int, dict]) -> list[float]:
    """Dead experts per layer of each seed's run that routes (none for plain LoRA)."""
    return [d for d in (dead_per_layer(by_seed[s]["load_over_tasks"]) for s in sorted(by_seed)) if d is not None]


def verdict(diffs: list[float]) -> str:
    m, s = mean_sd(diffs)
    if len(diffs) < 2:
        return "one seed: no claim"
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(m) > s:
        return "higher" if m > 0 else "lower"
    return "within spread"


def tables(runs: dict[str, dict[int, dict]], baseline: str | None) -> str:
    names = sorted(runs, key=lambda n: (n != baseline, n))
    lines = ["| method | seeds | average EM, mean ± sd | per seed | dead experts per layer |", "|---|---|---:|---|---:|"]
    for n in names:
        seeds = sorted(runs[n])
        avgs = [runs[n][s]["average"] for s in seeds]
        dead = dead_values(runs[n])
        lines.append(f"| {n} | {', '.join(map(str, seeds))} | {fmt(avgs)} | "
                     f"{', '.join(f'{a:.1f}' for a in avgs)} | {fmt(dead) if dead else '–'} |")
    out = ["## Average exact match over the held-out split (%)", "", *lines, ""]
    if baseline in runs:
        out += [f"## Paired difference against {baseline} (same seed: same data, order and held-out examples)", "",
                "| method | common seeds | difference, mean ± sd | per seed | verdict |", "|---|---|---:|---|---|"]
        for n in names:
            if n == baseline:
                continue
            common = sorted(set(runs[n]) & set(runs[baseline]))
            if not common:
                continue
            diffs = [runs[n][s]["average"] - runs[baseline][s]["average"] for s in common]
            out.append(f"| {n} | {', '.join(map(str, common))} | {fmt(diffs)} | "
                       f"{', '.join(f'{d:+.1f}' for d in diffs)} | {verdict(diffs)} |")
        out.append("")
    tasks = sorted({t for n in names for s in runs[n] for t in runs[n][s]["per_task"]})
    out += ["## Per task, mean ± sd over the seeds (%)", "", "| task | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names)]
    for t in tasks:
        cells = [fmt([runs[n][s]["per_task"][t] for s in sorted(runs[n]) if t in runs[n][s]["per_task"]]) for n in names]
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def summary(runs: dict[str, dict[int, dict]]) -> dict:
    """{method: {"seeds", "average": {mean, sd, per_seed}, "per_task": {task: {mean, sd}}, "dead_per_layer"}} in
    percent: what the model cards quote (scripts/release_zoo.py reads it from model_cards/seeds.json)."""
    def stats(values: list[float]) -> dict:
        m, s = mean_sd(values)
        return {"mean": round(m, 4), "sd": round(s, 4) if len(values) > 1 else None}

    out = {}
    for name, by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        tasks = sorted({t for s in seeds for t in by_seed[s]["per_task"]})
        dead = dead_values(by_seed)
        out[name] = {"seeds": seeds,
                     "average": {**stats([by_seed[s]["average"] for s in seeds]),
                                 "per_seed": [round(by_seed[s]["average"], 4) for s in seeds]},
                     "per_task": {t: stats([by_seed[s]["per_task"][t] for s in seeds if t in by_seed[s]["per_task"]])
                                  for t in tasks},
                     "dead_per_layer": stats(dead) if dead else None}
    return out


def write_summary(path: Path, runs: dict[str, dict[int, dict]], provenance: dict | None = None):
    """summary(runs) into the JSON at path: the methods of this table replace their entries, the others stay
    (model_cards/seeds.json gathers methods scored in different sessions). `provenance` ({"code": date,
    "results": RESULTS.md sections}) goes into each new entry: the cards say which code the seeds ran on."""
    kept = json.loads(path.read_text()) if path.is_file() else {}
    new = {name: {**entry, "provenance": provenance} if provenance else entry for name, entry in summary(runs).items()}
    path.write_text(json.dumps(dict(sorted({**kept, **new}.items())), indent=1) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("roots", type=Path, nargs="+", help="folders of <seed>/<name> runs (scripts/seed_runs.sh's "
                   "runs/seeds) or of <seed>/<name>.json records (benchmarks/results/seeds)")
    p.add_argument("--baseline", default=None, help="method the paired differences are taken against")
    p.add_argument("--only", nargs="+", default=None, help="methods to include (default: all found)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    p.add_argument("--json", type=Path, default=None, help="write the summary (summary()) as JSON here; methods "
                   "already in the file and not in this table are kept")
    p.add_argument("--record", type=Path, default=None, help="write each run's record to <here>/<seed>/<name>.json")
    p.add_argument("--code-date", default=None, help="with --json: the date of the code the seeds ran on (the cards "
                   "quote it)")
    p.add_argument("--results-section", default=None, help="with --json: where benchmarks/RESULTS.md reports them, "
                   "e.g. '§19'")
    a = p.parse_args()
    if (a.code_date is None) != (a.results_section is None):
        p.error("--code-date and --results-section go together")
    runs = load_runs(*a.roots)
    if a.only:
        runs = {n: r for n, r in runs.items() if n in a.only}
    if not runs:
        print(f"error: no <seed>/<name>/eval/<name>/results.json or <seed>/<name>.json under "
              f"{', '.join(map(str, a.roots))} (scripts/seed_runs.sh writes them)", file=sys.stderr)
        raise SystemExit(2)
    if a.record:
        write_records(runs, a.record)
    text = tables(runs, a.baseline)
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        write_summary(a.json, runs, {"code": a.code_date, "results": a.results_section} if a.code_date else None)


if __name__ == "__main__":
    main()
