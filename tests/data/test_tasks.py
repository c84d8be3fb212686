"""The built-in task suite: size, determinism, disjoint splits, correct answers, name errors."""

import random
import re

import pytest

from moelora.data.tasks import TASKS, WORDS, build_task_suite
from moelora.errors import DataError


def test_at_least_ten_tasks_and_word_list():
    assert len(TASKS) >= 10
    assert len(WORDS) >= 100 and all(w.isalpha() and w.islower() for w in WORDS)


def test_deterministic_and_seed_dependent():
    a = build_task_suite("all", 30, 10, seed=3)
    b = build_task_suite("all", 30, 10, seed=3)
    c = build_task_suite("all", 30, 10, seed=4)
    assert a == b
    assert a != c


def test_does_not_touch_global_rng():
    random.seed(0)
    state = random.getstate()
    build_task_suite("all", 5, 5, seed=0)
    assert random.getstate() == state


def test_counts_and_disjoint_splits():
    train, evals = build_task_suite("all", 100, 40, seed=0)
    for name in TASKS:
        assert sum(e["task"] == name for e in train) == 100
        assert sum(e["task"] == name for e in evals) == 40
    train_instr = [e["instruction"] for e in train]
    eval_instr = [e["instruction"] for e in evals]
    assert len(set(train_instr)) == len(train_instr)
    assert len(set(eval_instr)) == len(eval_instr)
    assert not set(train_instr) & set(eval_instr)
    assert all(set(e) == {"task", "instruction", "response"} for e in train + evals)


def test_eval_split_stable_when_train_size_changes():
    _, ev_small = build_task_suite(["add", "reverse_word"], 10, 20, seed=1)
    _, ev_big = build_task_suite(["add", "reverse_word"], 200, 20, seed=1)
    assert ev_small == ev_big


def _nums(text):
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _recompute(ex):
    """An independent oracle: parse the instruction and compute the answer from scratch."""
    task, ins = ex["task"], ex["instruction"]
    word = ins.rsplit(" ", 1)[-1]
    if task in ("add", "subtract", "multiply"):
        a, b = _nums(ins)
        return str({"add": a + b, "subtract": a - b, "multiply": a * b}[task])
    if task == "reverse_word":
        return "".join(reversed(word))
    if task == "uppercase_word":
        return word.upper()
    if task == "last_letter":
        return word[len(word) - 1]
    if task == "count_letter":
        letter = re.search(r"letter '(\w)'", ins).group(1)
        return str(sum(ch == letter for ch in word))
    if task in ("sort_asc", "sort_desc"):
        xs = sorted(_nums(ins), reverse=task == "sort_desc")
        return ", ".join(map(str, xs))
    if task == "max_of_list":
        return str(max(_nums(ins)))
    if task == "min_of_list":
        return str(min(_nums(ins)))
    if task == "unit_convert":
        v = _nums(ins)[0]
        factor = {"km": 1000, "kg": 1000, "h": 60, "m": 100, "min": 60, "L": 1000}[ins.split()[2]]
        return str(v * factor)
    raise AssertionError(f"no oracle for task {task}")


def test_answers_are_correct():
    train, evals = build_task_suite("all", 60, 20, seed=7)
    for ex in train + evals:
        assert ex["response"] == _recompute(ex), ex
    sorts = [e for e in evals if e["task"] == "sort_asc"]
    assert all(len(_nums(e["response"])) == 4 and re.fullmatch(r"\d(, \d){3}", e["response"]) for e in sorts)
    assert all(int(e["response"]) >= 0 for e in train if e["task"] == "subtract")


def test_unknown_task_lists_valid_names_and_suggests():
    with pytest.raises(DataError) as err:
        build_task_suite(["add", "revers_word"], 1, 1, seed=0)
    msg = str(err.value)
    assert "revers_word" in msg and "did you mean 'reverse_word'" in msg and "sort_asc" in msg


def test_bad_sizes_and_exhausted_task():
    with pytest.raises(DataError, match="n_train_per_task"):
        build_task_suite("all", -1, 1, seed=0)
    with pytest.raises(DataError, match="multiply"):  # 8 * 90 * 2 orders = 1440 distinct instructions
        build_task_suite(["multiply"], 2000, 10, seed=0)
    with pytest.raises(DataError, match="no tasks"):
        build_task_suite([], 1, 1, seed=0)
