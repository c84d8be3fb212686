"""Which data a run trains on: user files replace the built-in suite unless both are asked for; task optional."""

import json

import pytest

from moelora.errors import DataError
from moelora.training.examples import load_examples
from moelora.training.run_config import load_run_config
from tests.processes import REPO

SMALL = ["data.n_train_per_task=3", "data.n_eval_per_task=2"]


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_user_files_replace_the_builtin_suite_unless_both_are_asked(tmp_path):
    mine = _file(tmp_path, "mine.jsonl", [{"instruction": "q", "response": "a"}])
    held = _file(tmp_path, "held.jsonl", [{"task": "qa", "instruction": "q2", "response": "b"}])
    # No files: every built-in task (the shipped configs say tasks: auto as well).
    cfg = load_run_config(str(REPO / "configs/smora.yaml"), SMALL)
    assert cfg.data.tasks == "all"
    tr, ev = load_examples(cfg)
    assert len({ex["task"] for ex in tr}) == 12 and len(ev) == 24
    # Files: only the files (tasks resolves to "none", and the saved training_config says so).
    cfg = load_run_config(str(REPO / "configs/smora.yaml"), [*SMALL, f"data.train_files=[{mine}]",
                                                             f"data.eval_files=[{held}]"])
    assert cfg.data.tasks == "none" and cfg.to_dict()["data"]["tasks"] == "none"
    tr, ev = load_examples(cfg)
    assert tr == [{"task": "default", "instruction": "q", "response": "a"}]
    assert ev == [{"task": "qa", "instruction": "q2", "response": "b"}]
    # An explicit data.tasks with files: both.
    cfg = load_run_config(None, [*SMALL, "data.tasks=[add]", f"data.train_files=[{mine}]",
                                 "data.default_task=chat"])
    tr, _ = load_examples(cfg)
    assert [ex["task"] for ex in tr] == ["add"] * 3 + ["chat"]


def test_task_routed_method_requires_the_task_field(tmp_path):
    mine = _file(tmp_path, "mine.jsonl", [{"task": "add", "instruction": "1+1", "response": "2"},
                                          {"instruction": "q", "response": "a"}])
    stage1 = "method={name: lora_mixer, experts: [add, reverse_word], stage: joint_stage1, r: 2}"
    cfg = load_run_config(None, [*SMALL, stage1, f"data.train_files=[{mine}]"])
    with pytest.raises(DataError, match=r"mine.jsonl', row index 1: missing or empty task field 'task' "
                                        r"\(method lora_mixer routes each row by its task label"):
        load_examples(cfg)
    cfg = load_run_config(None, [*SMALL, "method={name: smora, r: 4, k: 2}", f"data.train_files=[{mine}]"])
    assert [ex["task"] for ex in load_examples(cfg)[0]] == ["add", "default"]
