"""`data.group_by_length`: batches of similar length (less padding), still every example once per epoch, in a
random batch order that a resume reproduces."""

import random

import pytest
import torch
from safetensors.torch import load_file

from moelora.errors import ConfigError
from moelora.training.batches import MEGABATCH, BatchOrder
from tests.training.test_train_cli import _log, _run

QUIET = ["eval_before_training=false", "data.n_eval_per_task=0"]


def _epoch(order: BatchOrder, epoch: int) -> list[list[int]]:
    """The epoch's global batches (every rank's part joined)."""
    first = epoch * order.batches_per_epoch
    return [order.indices(first + b) for b in range(order.batches_per_epoch)]


def _padded(batches, lengths) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n", [1000, 1003, 57])
def test_each_example_at_most_once_and_whole_batches_only(n):
    lengths = [random.Random(i).randrange(5, 90) for i in range(n)]
    order = BatchOrder(n, 8, seed=3, lengths=lengths)
    for epoch in range(2):
        batches = _epoch(order, epoch)
        flat = [i for b in batches for i in b]
        assert len(batches) == n // 8 and all(len(b) == 8 for b in batches)
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))


def test_batches_hold_similar_lengths_so_padding_falls():
    rng = random.Random(0)
    lengths = [rng.choice([12, 18, 28, 60, 80]) + rng.randrange(3) for _ in range(4000)]
    plain, grouped = BatchOrder(4000, 16, seed=1), BatchOrder(4000, 16, seed=1, lengths=lengths)
    real = sum(lengths[i] for b in _epoch(grouped, 0) for i in b)
    assert _padded(_epoch(plain, 0), lengths) > 1.8 * real  # mixed lengths pad to the longest of five kinds
    assert _padded(_epoch(grouped, 0), lengths) < 1.1 * real


def test_batch_order_is_random_and_fixed_by_seed_and_epoch():
    lengths = list(range(16 * MEGABATCH * 2))  # strictly increasing: sorting alone would give one fixed order
    a = BatchOrder(len(lengths), 16, seed=5, lengths=lengths)
    b = BatchOrder(len(lengths), 16, seed=5, lengths=lengths)
    assert _epoch(a, 0) == _epoch(b, 0) and _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1) != _epoch(BatchOrder(len(lengths), 16, seed=6, lengths=lengths), 1)
    maxima = [max(lengths[i] for i in batch) for batch in _epoch(a, 0)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)  # not longest-first, not shortest-first


def test_ranks_split_each_global_batch():
    lengths = [random.Random(i).randrange(100) for i in range(640)]
    ranks = [BatchOrder(640, 4, world=2, rank=r, seed=2, lengths=lengths) for r in range(2)]
    one = BatchOrder(640, 8, seed=2, lengths=lengths)
    for step in range(one.batches_per_epoch):
        assert ranks[0].indices(step) + ranks[1].indices(step) == one.indices(step)


def test_lengths_must_match_the_examples():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        BatchOrder(4, 2, lengths=[1, 2, 3])


def test_a_grouped_run_resumes_to_the_same_adapter_and_refuses_a_changed_setting(tmp_path, monkeypatch):
    seen = []
    init = BatchOrder.__init__

    def spy(self, *args, lengths=None, **kwargs):
        seen.append(lengths)
        init(self, *args, lengths=lengths, **kwargs)

    monkeypatch.setattr(BatchOrder, "__init__", spy)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # a constant rate: the first half's schedule must not depend on max_steps
    steps = ["save_steps=2", "lr_scheduler_type=constant", "warmup_ratio=0", *QUIET, "data.group_by_length=true"]
    _run(straight, "max_steps=6", *steps)
    assert len(seen[0]) == 120 and len(set(seen[0])) > 3  # train.py handed every example's token count
    _run(resumed, "max_steps=3", *steps)
    with pytest.raises(ConfigError, match="data.group_by_length"):
        _run(resumed, "max_steps=6", *steps[:-1], "resume_from_checkpoint=true")
    _run(resumed, "max_steps=6", *steps, "resume_from_checkpoint=true")
    want = load_file(str(straight / "adapter/adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter/adapter_model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert _log(resumed)[-1]["loss"] == pytest.approx(_log(straight)[-1]["loss"], abs=1e-6)
    _run(tmp_path / "plain", "max_steps=1", *steps[:-1])
    assert seen[-1] is None  # off by default: the plain shuffle
