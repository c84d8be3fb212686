"""The released checkpoints in model_cards/: small, loadable in one call, and their recorded metrics reproduce.

Each card's `eval/results.json` holds every prediction `scripts/release_zoo.py` recorded with evaluate.py.
Here each checkpoint is loaded from the repository files and re-scored on a slice (the first examples of its
two best tasks). Generation batches differ from the recorded run (fewer rows, so other padding widths), which
may flip a near-tie greedy token in float32; the test allows one differing prediction per task and slice.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CARDS = sorted(p.parent for p in (REPO / "model_cards").glob("*/manifest.json"))
RELEASED = {"lora-8", "lora-64", "smora-64-8", "lora-mixer", "xlora", "mixlora", "modality", "lora-16-multimodal"}
SLICE = 6


def front_matter(card: Path) -> dict:
    text = (card / "README.md").read_text()
    assert text.startswith("---\n"), f"{card}/README.md has no YAML front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_every_checkpoint_is_released_with_card_and_results():
    assert {c.name for c in CARDS} == RELEASED
    for card in CARDS:
        # peft/ (plain-LoRA cards) is the same adapter in PEFT's format, counted once: test_peft_copies_...
        size_mb = sum(f.stat().st_size for f in card.rglob("*.safetensors") if "peft" not in f.parent.name) / 1e6
        assert size_mb <= 12.0, f"{card.name}: {size_mb:.1f} MB"  # "~10 MB"; SMoRA's router makes it 11.8
        recorded = json.loads((card / "eval" / "results.json").read_text())
        index = front_matter(card)["model-index"][0]["results"]
        card_numbers = {r["task"]["name"]: r["metrics"][0]["value"] for r in index}
        assert card_numbers == {t: round(100 * v, 1) for t, v in recorded["per_task"].items()}
        for task, em in recorded["per_task"].items():  # the card's numbers are the recorded predictions'
            hits = [p["correct"] for p in recorded["predictions"] if p["task"] == task]
            assert em == pytest.approx(sum(hits) / len(hits))
        assert not list(card.glob("*.bin")) and not list(card.glob("*.pt"))


def test_plain_lora_cards_ship_a_peft_copy_of_the_same_tensors():
    from moelora.checkpoint import load_tensors
    from moelora.peft_compat import peft_tensors

    with_peft = set()
    for card in CARDS:
        meta = json.loads((card / "moelora_config.json").read_text())
        if meta["method"] != "lora" or meta.get("encoders"):
            assert not (card / "peft").exists()
            continue
        with_peft.add(card.name)
        peft_cfg = json.loads((card / "peft" / "adapter_config.json").read_text())
        assert peft_cfg["base_model_name_or_path"] == front_matter(card)["base_model"]
        assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (meta["config"]["r"], meta["config"]["alpha"])
        ours, theirs = peft_tensors(load_tensors(card / "adapter_model.safetensors")), load_tensors(card / "peft" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
        assert "peft/" in (card / "README.md").read_text()
    assert with_peft == {"lora-8", "lora-64"}


@pytest.mark.integration
@pytest.mark.parametrize("card", CARDS, ids=[c.name for c in CARDS])
def test_released_checkpoint_reproduces_its_recorded_predictions(card):
    import moelora
    from moelora.eval_suite import evaluate_tasks, load_eval_examples

    recorded = json.loads((card / "eval" / "results.json").read_text())
    settings = recorded["settings"]
    best = sorted(recorded["per_task"], key=lambda t: -recorded["per_task"][t])[:2]
    examples = load_eval_examples(best, settings["n_eval_per_task"], settings["seed"])
    examples = {t: exs[:SLICE] for t, exs in examples.items()}
    model, tokenizer = moelora.load(card)
    now = evaluate_tasks(model, tokenizer, examples, settings["batch_size"], settings["max_new_tokens"])
    for task in best:
        then = [p for p in recorded["predictions"] if p["task"] == task][:SLICE]
        again = [p for p in now["predictions"] if p["task"] == task]
        assert [p["target"] for p in again] == [p["target"] for p in then]  # the same held-out examples
        differ = sum(a["prediction"] != b["prediction"] for a, b in zip(again, then))
        assert differ <= 1, (task, [p["prediction"] for p in again], [p["prediction"] for p in then])
        if any(p["correct"] for p in then):
            assert any(p["correct"] for p in again)


@pytest.mark.integration
def test_evaluate_cli_runs_on_a_released_card(tmp_path):
    sys.path.insert(0, str(REPO))
    import evaluate

    results = evaluate.main(["--checkpoint", str(REPO / "model_cards" / "lora-8"), "--tasks", "sort_asc",
                             "--limit-per-task", "4", "--out", str(tmp_path)])
    recorded = json.loads((REPO / "model_cards/lora-8/eval/results.json").read_text())
    then = [p["prediction"] for p in recorded["predictions"] if p["task"] == "sort_asc"][:4]
    assert sum(a != b for a, b in zip([p["prediction"] for p in results["lora-8"]["predictions"]], then)) <= 1
    assert (tmp_path / "comparison.md").is_file()
