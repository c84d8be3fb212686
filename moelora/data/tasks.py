"""The built-in multi-task suite: generated tasks with short exact-match answers.

Tasks come in groups whose inputs look alike but whose skills conflict, so a single LoRA must
share capacity between them while a routed mixture can specialise:

* arithmetic on two numbers: ``add``, ``subtract``, ``multiply``
* string transforms of one word: ``reverse_word``, ``uppercase_word``, ``last_letter``, ``count_letter``
* operations on a short number list: ``sort_asc``, ``sort_desc``, ``max_of_list``, ``min_of_list``
* ``unit_convert`` (km->m, kg->g, h->min, ...), answer a bare number

Every example is ``{"task", "instruction", "response"}``. ``build_task_suite`` is deterministic for a
seed and its eval split never shares an instruction with the train split.
"""

from __future__ import annotations

import difflib
import random
import zlib
from typing import Callable, Iterable

from moelora.errors import DataError

# ~100 common, short English words (lower case, letters only).
WORDS: tuple[str, ...] = tuple(
    """
    apple river house table chair water light green happy music paper stone plant bread cloud dream
    earth field glass heart horse juice knife lemon money night ocean piano queen radio smile tiger
    train voice watch zebra angel beach candy dance eagle flame grape honey igloo jelly koala lunch
    magic nurse olive party quiet robot sugar tooth uncle video whale youth blue cat dog sun moon star
    tree bird fish book door hand road rain snow wind fire milk salt rice corn frog duck lion bear wolf
    king ship coat ring bell drum kite lamp nest pear rose shoe sock tent wall yard garden window
    pencil orange yellow purple silver summer winter planet rocket butter spider monkey castle
    """.split()
)
assert len(WORDS) == len(set(WORDS)) and len(WORDS) >= 100

# Pseudo-words widen the string tasks beyond the word list, so large splits stay distinct.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

Example = dict  # {"task": str, "instruction": str, "response": str}


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _nums(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(k)]


def _fmt(nums: Iterable[int]) -> str:
    return ", ".join(str(n) for n in nums)


# ---------------------------------------------------------------- generators: rng -> (instruction, response)


def _add(rng):
    a, b = _nums(rng, 2, 10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(rng):
    a, b = sorted(_nums(rng, 2, 10, 99), reverse=True)  # keep answers non-negative
    return f"What is {a} - {b}?", str(a - b)


def _multiply(rng):
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    if rng.random() < 0.5:
        a, b = b, a
    return f"What is {a} * {b}?", str(a * b)


def _reverse_word(rng):
    w = _word(rng)
    return f"Reverse the letters of the word: {w}", w[::-1]


def _uppercase_word(rng):
    w = _word(rng)
    return f"Write the word in uppercase: {w}", w.upper()


def _last_letter(rng):
    w = _word(rng)
    return f"What is the last letter of the word: {w}", w[-1]


def _count_letter(rng):
    w = _word(rng)
    # Mostly ask about a letter that occurs; sometimes one that does not (answer 0).
    c = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"How many times does the letter '{c}' appear in the word: {w}", str(w.count(c))


def _sort_asc(rng):
    xs = _nums(rng, 4, 0, 9)
    return f"Sort these numbers in ascending order: {_fmt(xs)}", _fmt(sorted(xs))


def _sort_desc(rng):
    xs = _nums(rng, 4, 0, 9)
    return f"Sort these numbers in descending order: {_fmt(xs)}", _fmt(sorted(xs, reverse=True))


def _max_of_list(rng):
    xs = _nums(rng, rng.randint(4, 5), 0, 99)
    return f"What is the largest number in this list: {_fmt(xs)}", str(max(xs))


def _min_of_list(rng):
    xs = _nums(rng, rng.randint(4, 5), 0, 99)
    return f"What is the smallest number in this list: {_fmt(xs)}", str(min(xs))


_UNITS = (("km", "m", 1000), ("kg", "g", 1000), ("h", "min", 60), ("m", "cm", 100), ("min", "s", 60), ("L", "mL", 1000))


def _unit_convert(rng):
    src, dst, factor = rng.choice(_UNITS)
    v = rng.randint(1, 199)
    return f"Convert {v} {src} to {dst}. Answer with the number only.", str(v * factor)


def _as_task(name: str, fn: Callable[[random.Random], tuple[str, str]]) -> Callable[[random.Random], Example]:
    def gen(rng: random.Random) -> Example:
        instruction, response = fn(rng)
        return {"task": name, "instruction": instruction, "response": response}

    gen.__name__ = f"gen_{name}"
    gen.__doc__ = f"Draw one '{name}' example from rng."
    return gen


_RAW = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "reverse_word": _reverse_word,
    "uppercase_word": _uppercase_word,
    "last_letter": _last_letter,
    "count_letter": _count_letter,
    "sort_asc": _sort_asc,
    "sort_desc": _sort_desc,
    "max_of_list": _max_of_list,
    "min_of_list": _min_of_list,
    "unit_convert": _unit_convert,
}
#: task name -> generator ``fn(random.Random) -> {"task", "instruction", "response"}``
TASKS: dict[str, Callable[[random.Random], Example]] = {n: _as_task(n, f) for n, f in _RAW.items()}


def resolve_task_names(tasks: str | Iterable[str]) -> list[str]:
    """Validate task names ("all" or a list), keeping order and dropping duplicates."""
    if isinstance(tasks, str):
        names = list(TASKS) if tasks == "all" else [tasks]
    else:
        names = list(dict.fromkeys(tasks))
    if not names:
        raise DataError(f"no tasks selected; valid task names: {', '.join(TASKS)}")
    for n in names:
        if n not in TASKS:
            close = difflib.get_close_matches(str(n), list(TASKS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(f"unknown task '{n}'{hint}; valid task names: all, {', '.join(TASKS)}")
    return names


def _draw_unique(name: str, rng: random.Random, n: int, seen: set[str], asked: int) -> list[Example]:
    gen, out = TASKS[name], []
    attempts, max_attempts = 0, 50 * n + 1000  # generous: only tiny sample spaces can run out
    while len(out) < n:
        if attempts >= max_attempts:
            raise DataError(
                f"task '{name}' cannot produce {asked} distinct examples (found {len(seen)} unique "
                f"instructions); lower n_train_per_task / n_eval_per_task"
            )
        attempts += 1
        ex = gen(rng)
        if ex["instruction"] not in seen:
            seen.add(ex["instruction"])
            out.append(ex)
    return out


def train_counts(names: list[str], n_train_per_task: int, n_eval_per_task: int,
                 n_train_for: dict[str, int] | None = None) -> dict[str, int]:
    """Training examples per selected task: n_train_per_task, or n_train_for's value for the tasks it names.
    Each task's examples come from its own RNG stream after its held-out ones, so a larger count keeps the
    first n_train_per_task examples and adds new ones (and never changes the held-out split)."""
    for key, n in (("n_train_per_task", n_train_per_task), ("n_eval_per_task", n_eval_per_task),
                   *((f"n_train_for.{t}", v) for t, v in (n_train_for or {}).items())):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{key} must be a non-negative integer, got {n!r}")
    unknown = sorted(set(n_train_for or ()) - set(names))
    if unknown:
        raise DataError(f"n_train_for names {', '.join(map(repr, unknown))}, not among the selected tasks "
                        f"({', '.join(names)})")
    return {name: (n_train_for or {}).get(name, n_train_per_task) for name in names}


def build_task_suite(
    tasks: str | list[str] = "all", n_train_per_task: int = 200, n_eval_per_task: int = 50, seed: int = 0,
    n_train_for: dict[str, int] | None = None,
) -> tuple[list[Example], list[Example]]:
    """Generate ``(train, eval)`` for the selected tasks (``n_train_for``: other train sizes for named tasks).

    Eval is drawn first from each task's own RNG stream, so it depends only on ``(seed, n_eval)`` and
    stays fixed when the train size changes; train then skips every eval instruction.
    """
    names = resolve_task_names(tasks)
    counts = train_counts(names, n_train_per_task, n_eval_per_task, n_train_for)
    train: list[Example] = []
    evals: list[Example] = []
    for name in names:
        # crc32, not hash(): Python's str hash is salted per process and would break determinism.
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
        seen: set[str] = set()
        asked = counts[name] + n_eval_per_task
        evals += _draw_unique(name, rng, n_eval_per_task, seen, asked)
        train += _draw_unique(name, rng, counts[name], seen, asked)
    # Mix tasks in train so naive sequential consumers still see every task early.
    random.Random(seed).shuffle(train)
    return train, evals
