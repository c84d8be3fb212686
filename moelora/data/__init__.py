"""Data for moelora: the built-in multi-task suite, user data files, and chat formatting/batching."""

from moelora.data.formatting import (
    IGNORE_INDEX,
    Collator,
    build_generation_prompts,
    encode_example,
    encode_examples,
    end_of_turn_token,
    split_prompt_response,
)
from moelora.data.tasks import TASKS, WORDS, build_task_suite, resolve_task_names
from moelora.data.user_data import load_user_data

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "TASKS",
    "WORDS",
    "build_generation_prompts",
    "build_task_suite",
    "encode_example",
    "encode_examples",
    "end_of_turn_token",
    "load_user_data",
    "resolve_task_names",
    "split_prompt_response",
]
