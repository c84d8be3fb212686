"""evaluate.py: per-task results and predictions, comparison across models, routing plots, processes."""

import json
import sys
from pathlib import Path

import pytest

from moelora.base_models import resolve_base_model
from moelora.model import get_moelora_model
from moelora.multimodal.encoders import EncoderConfig
from tests.conftest import randomize_adapters
from tests.processes import REPO, accelerate_launch, run

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _checkpoint(folder: Path, method: dict, encoders=None) -> Path:
    base, _ = resolve_base_model("tiny-random-llama")
    model = get_moelora_model(base, method, "tiny-random-llama", encoders=encoders)
    randomize_adapters(model, scale=0.2)  # B = 0 would make every checkpoint equal to the base
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "smora": _checkpoint(root / "smora", {"name": "smora", "r": 8, "k": 2, "target_modules": ["q_proj", "v_proj"]}),
        "lora": _checkpoint(root / "lora" / "adapter", {"name": "lora", "r": 4, "target_modules": ["q_proj"]}),
    }


def test_scores_every_task_writes_predictions_tables_and_plots(checkpoints, tmp_path):
    out = tmp_path / "eval"
    results = evaluate.main(["--checkpoint", str(checkpoints["smora"]), str(checkpoints["lora"]),
                             "--tasks", "add", "sort_asc", "--limit-per-task", "3", "--out", str(out)])
    assert list(results) == ["base", "smora", "lora"]  # a folder named "adapter" is named after its parent
    for name in results:
        saved = json.loads((out / name / "results.json").read_text())
        assert [p["task"] for p in saved["predictions"]] == ["add"] * 3 + ["sort_asc"] * 3
        for task in ("add", "sort_asc"):  # the per-task score is the mean of the recorded predictions
            hits = [p["correct"] for p in saved["predictions"] if p["task"] == task]
            assert saved["per_task"][task] == pytest.approx(sum(hits) / len(hits))
            assert all(p["correct"] == (p["prediction"] == p["target"]) for p in saved["predictions"])
        assert "| add |" in (out / name / "results.md").read_text()
    # The learned router's load is recorded per task and plotted; LoRA and the base have no router.
    routing = json.loads((out / "smora" / "routing.json").read_text())["per_task"]
    assert set(routing) == {"add", "sort_asc"}
    loads = routing["add"]
    assert len(loads) == 4 and all(len(v) == 8 and sum(v) == pytest.approx(1.0, abs=1e-3) for v in loads.values())
    for png in ("router_load.png", "task_routing.png"):
        assert (out / "smora" / png).read_bytes()[:8] == PNG
    assert not (out / "lora" / "routing.json").exists() and not (out / "base" / "router_load.png").exists()
    table = (out / "comparison.md").read_text()
    assert table.splitlines()[0] == "| task | base | smora | lora |"
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["models"]["smora"]["method"] == "smora" and summary["settings"]["limit_per_task"] == 3


def test_same_examples_same_predictions_whatever_else_is_evaluated(checkpoints, tmp_path):
    # A task's result does not depend on which other tasks or models are scored alongside it.
    both = evaluate.main(["--checkpoint", str(checkpoints["smora"]), "--no-base", "--tasks", "add", "sort_asc",
                          "--limit-per-task", "3", "--out", str(tmp_path / "a"), "--no-plots"])
    one = evaluate.main(["--checkpoint", str(checkpoints["smora"]), "--no-base", "--tasks", "sort_asc",
                         "--limit-per-task", "3", "--out", str(tmp_path / "b"), "--no-plots"])
    pick = [p for p in both["smora"]["predictions"] if p["task"] == "sort_asc"]
    assert [p["prediction"] for p in pick] == [p["prediction"] for p in one["smora"]["predictions"]]


def test_multimodal_tasks_skip_models_without_encoders(tmp_path):
    ckpt = _checkpoint(tmp_path / "mm", {"name": "lora", "r": 4, "target_modules": ["q_proj"]}, encoders=EncoderConfig())
    out = tmp_path / "eval"
    results = evaluate.main(["--checkpoint", str(ckpt), "--tasks", "digit_read", "add", "--limit-per-task", "2",
                             "--out", str(out), "--no-plots"])
    assert set(results["mm"]["per_task"]) == {"digit_read", "add"}
    assert set(results["base"]["per_task"]) == {"add"}  # the base model cannot see the image
    table = (out / "comparison.md").read_text()
    assert "| digit_read | – |" in table
    assert "average over the 1 tasks every model was scored on" in table


def test_user_eval_files_are_scored_per_task(checkpoints, tmp_path):
    rows = [{"instruction": f"Say {w}.", "response": w, "task": task}
            for task, words in (("echo", ["yes", "no", "maybe"]), ("greet", ["hi"])) for w in words]
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = evaluate.main(["--checkpoint", str(checkpoints["lora"]), "--tasks", "none", "--eval-files", str(data),
                             "--out", str(tmp_path / "eval"), "--no-plots"])
    assert results["lora"]["n"] == {"echo": 3, "greet": 1} == results["base"]["n"]
    assert [p["target"] for p in results["lora"]["predictions"]] == ["yes", "no", "maybe", "hi"]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "no/such/folder"], "checkpoint folder not found: no/such/folder"),
    (["--tasks", "ad", "--base-model", "tiny-random-llama"], "unknown task 'ad'"),
])
def test_bad_input_one_line_exit_2(args, message, tmp_path, capsys):
    assert evaluate.cli([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_two_models_with_one_name_are_refused(checkpoints, tmp_path, capsys):
    other = _checkpoint(tmp_path / "x" / "smora", {"name": "lora", "r": 2, "target_modules": ["q_proj"]})
    assert evaluate.cli(["--checkpoint", str(checkpoints["smora"]), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "two models would share a name" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(checkpoints, tmp_path):
    args = ["--checkpoint", str(checkpoints["smora"]), "--tasks", "add", "sort_asc", "multiply",
            "--limit-per-task", "3", "--no-plots"]
    one = evaluate.main([*args, "--out", str(tmp_path / "one")])
    run(accelerate_launch(2, REPO / "evaluate.py", *args, "--out", tmp_path / "two"), one_thread=False)
    two = json.loads((tmp_path / "two" / "comparison.json").read_text())["models"]
    for name in one:
        assert two[name]["per_task"] == one[name]["per_task"]
    preds = json.loads((tmp_path / "two" / "smora" / "results.json").read_text())["predictions"]
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in one["smora"]["predictions"]]
