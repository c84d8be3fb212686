"""The settings of the tiny train.py runs the tests share: the random base, a per-step JSONL log and a learning rate
that moves a few steps visibly, then the text or the multimodal data. Each test adds what it is about."""

import sys

from tests.processes import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402,F401  (train.py at the repository root: the tests call train.main / train.cli)

TINY_RUN = ["base_model=tiny-random-llama", "report_to=[jsonl]", "logging_steps=1", "learning_rate=1e-2"]
TEXT = ["data.tasks=[add, reverse_word, sort_asc]", "data.n_train_per_task=40", "data.max_length=128",
        "per_device_train_batch_size=4"]
MULTIMODAL = ["data.suite=multimodal", "data.max_length=160", "per_device_train_batch_size=4"]
