"""data.n_train_for: more (or fewer) training examples for named built-in tasks, the rest unchanged."""

import pytest

from moelora.data.multimodal import build_multimodal_suite
from moelora.data.tasks import build_task_suite
from moelora.errors import ConfigError, DataError
from moelora.training.examples import load_examples
from moelora.training.run_config import load_run_config


def by_task(examples, task):
    return [e for e in examples if e["task"] == task]


def test_text_suite_grows_the_named_task_and_keeps_everything_else():
    base_train, base_eval = build_task_suite(["add", "sort_asc"], 20, 8, seed=5)
    train_, evals = build_task_suite(["add", "sort_asc"], 20, 8, seed=5, n_train_for={"add": 50})
    assert len(by_task(train_, "add")) == 50 and len(by_task(train_, "sort_asc")) == 20
    assert evals == base_eval  # the held-out split does not move
    key = lambda e: e["instruction"]  # noqa: E731 - the shuffle differs; the examples drawn do not
    assert sorted(by_task(base_train, "sort_asc"), key=key) == sorted(by_task(train_, "sort_asc"), key=key)
    assert {e["instruction"] for e in by_task(base_train, "add")} < {e["instruction"] for e in by_task(train_, "add")}
    assert not {e["instruction"] for e in train_} & {e["instruction"] for e in evals}


def test_multimodal_suite_sizes_media_and_text_tasks():
    base_train, base_eval = build_multimodal_suite(["digit_read", "add"], 5, 4, seed=1)
    train_, evals = build_multimodal_suite(["digit_read", "add"], 5, 4, seed=1, n_train_for={"digit_read": 12, "add": 7})
    assert len(by_task(train_, "digit_read")) == 12 and len(by_task(train_, "add")) == 7
    assert [(e["instruction"], e["response"], e.get("sources")) for e in evals] == \
        [(e["instruction"], e["response"], e.get("sources")) for e in base_eval]
    base_scans = {e["sources"][0] for e in by_task(base_train, "digit_read")}
    assert base_scans < {e["sources"][0] for e in by_task(train_, "digit_read")}  # the first 5 kept, 7 new


def test_a_task_not_selected_is_one_clear_error():
    with pytest.raises(DataError, match=r"n_train_for names 'shape_color', not among the selected tasks \(add\)"):
        build_task_suite(["add"], 5, 2, n_train_for={"shape_color": 10})
    with pytest.raises(DataError, match=r"n_train_for\.add must be a non-negative integer"):
        build_task_suite(["add"], 5, 2, n_train_for={"add": -1})


def test_config_checks_the_key():
    cfg = load_run_config(None, ["data.n_train_for={add: 30}"])
    assert cfg.data.n_train_for == {"add": 30}
    with pytest.raises(ConfigError, match=r"data\.n_train_for\.add.*>= 1"):
        load_run_config(None, ["data.n_train_for={add: 0}"])
    with pytest.raises(ConfigError, match=r"data\.n_train_for.*data\.tasks is none"):
        load_run_config(None, ["data.tasks=none", "data.train_files=[x.jsonl]", "data.n_train_for={add: 30}"])


def test_train_py_passes_it_to_the_suite():
    cfg = load_run_config(None, ["data.tasks=[add,sort_asc]", "data.n_train_per_task=6", "data.n_train_for={add: 9}"])
    examples, _ = load_examples(cfg)
    assert len(by_task(examples, "add")) == 9 and len(by_task(examples, "sort_asc")) == 6
