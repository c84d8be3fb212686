"""The optimizer step's one host read (moelora.training.step_health): each flag reports what it names."""

import math
from types import SimpleNamespace

import pytest
import torch

from moelora.training.step_health import read_step, weights_finite

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def test_a_healthy_step_reads_its_losses_in_micro_batch_order_and_its_norm():
    read = read_step(ONE_PROCESS, torch.tensor(2.5), TRUE, TRUE, [torch.tensor(0.25), torch.tensor(0.5)],
                     [torch.tensor(0.125)])
    assert (read.finite, read.weights_were_ok, read.loss_finite) == (True, True, True)
    assert read.grad_norm == 2.5 and read.lm_losses == [0.25, 0.5] and read.aux_losses == [0.125]


@pytest.mark.parametrize("norm, loss_ok, finite, loss_finite", [
    (torch.tensor(math.nan), TRUE, False, True),  # only the gradients overflowed: the scaler's business
    (torch.tensor(math.inf), TRUE, False, True),
    (torch.tensor(1.0), FALSE, False, False),  # the forward's loss itself is non-finite
])
def test_a_non_finite_gradient_or_loss_makes_the_step_not_finite(norm, loss_ok, finite, loss_finite):
    read = read_step(ONE_PROCESS, norm, loss_ok, TRUE, [torch.tensor(1.0)], [])
    assert (read.finite, read.loss_finite, read.weights_were_ok) == (finite, loss_finite, True)


def test_lost_weights_and_an_engine_without_a_norm():
    read = read_step(ONE_PROCESS, None, TRUE, FALSE, [torch.tensor(1.0)], [])
    assert read.grad_norm is None and read.finite and not read.weights_were_ok
    read = read_step(ONE_PROCESS, 3.0, TRUE, TRUE, [], [])  # a plain number, as some engines return
    assert read.grad_norm == 3.0 and read.lm_losses == [] and read.aux_losses == []


def test_weights_finite_sees_one_nan_anywhere():
    params = [torch.zeros(3, 4), torch.ones(5)]
    assert bool(weights_finite(params))
    params[1][2] = math.nan
    assert not bool(weights_finite(params))
    assert bool(weights_finite([torch.zeros(0)]))  # nothing to check: finite
