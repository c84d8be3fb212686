"""evaluate.py scores a checkpoint's own tasks and eval files (from its manifest), with eval loss / perplexity."""

import json
import sys
from pathlib import Path

import pytest

from tests.processes import REPO

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
import train  # noqa: E402


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_scores_the_checkpoints_own_tasks_with_the_training_loss(tmp_path, capsys):
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
    tr = _jsonl(tmp_path / "train.jsonl", [chat] * 4)
    ev = _jsonl(tmp_path / "eval.jsonl", [chat, {"task": "qa", "instruction": "1+1?", "response": "2"}])
    run = tmp_path / "run"
    train.main(["base_model=tiny-random-llama", "method={name: lora, r: 4}", f"output_dir={run}",
                "data.tasks=[add]", "data.n_train_per_task=4", "data.n_eval_per_task=2", f"data.train_files=[{tr}]",
                f"data.eval_files=[{ev}]", "data.max_length=64", "per_device_train_batch_size=4", "max_steps=1",
                "report_to=[none]", "eval_max_new_tokens=4", "learning_rate=1e-2"])
    trained = json.loads((run / "eval_results.json").read_text())
    out = tmp_path / "eval"
    results = evaluate.main(["--checkpoint", str(run / "adapter"), "--out", str(out), "--no-plots",
                             "--max-new-tokens", "4"])
    # Its own tasks: the built-in task it trained on and its eval file's tasks; not the other 11 built-in tasks.
    for name in ("base", "run"):
        assert list(results[name]["per_task"]) == ["add", "default", "qa"]
        assert results[name]["n"] == {"add": 2, "default": 1, "qa": 1}
    # The same examples and loss as train.py's final evaluation: the eval loss matches it.
    assert results["run"]["loss"] == pytest.approx(trained["trained"]["loss"], rel=1e-4)
    assert results["base"]["loss"] == pytest.approx(trained["base"]["loss"], rel=1e-4)
    saved = json.loads((out / "run" / "results.json").read_text())
    assert saved["perplexity"] == pytest.approx(results["run"]["perplexity"]) and set(saved["loss_per_task"]) == {
        "add", "default", "qa"}
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["models"]["run"]["loss"] == results["run"]["loss"]
    assert "| eval loss |" in (out / "comparison.md").read_text()
    # --eval-files with no file: only the built-in task; a moved eval file is named.
    only = evaluate.main(["--checkpoint", str(run / "adapter"), "--out", str(tmp_path / "e2"), "--no-plots",
                          "--no-base", "--eval-files"])
    assert list(only["run"]["per_task"]) == ["add"]
    Path(ev).rename(tmp_path / "moved.jsonl")
    assert evaluate.cli(["--checkpoint", str(run / "adapter"), "--out", str(tmp_path / "e3"), "--no-base"]) == 2
    err = capsys.readouterr().err
    assert f"trained with eval file {ev}, which is not found" in err and "Traceback" not in err
