"""The shared routing functions against hand computations (moelora/routing.py)."""

import math

import pytest
import torch

import moelora
from moelora.routing import (balance_loss, mean_entropy, per_token, sample_mean, supervised_gate_loss, top_k_gates,
                             token_weights)


def test_top_k_gates_each_gate_rule():
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    idx, g = top_k_gates(scores, 2, "renormalize")
    assert idx.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(g, torch.tensor([[0.6 / 0.9, 0.3 / 0.9], [0.5 / 0.8, 0.3 / 0.8]]))
    _, g = top_k_gates(scores, 2, "softmax", temperature=0.5)
    torch.testing.assert_close(g[0], torch.softmax(torch.tensor([1.2, 0.6]), 0))
    bias = torch.tensor([1.0, 0.0, 0.0])  # moves expert 0 into row 0's selection
    idx, g = top_k_gates(scores, 2, "raw", bias=bias, bias_in_gate=False)
    assert idx[0].tolist() == [0, 1] and g[0].tolist() == pytest.approx([0.1, 0.6])


def test_top_k_gates_compute_in_fp32_under_a_16_bit_router():
    scores = torch.rand(64, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    idx, g = top_k_gates(scores, 5, "renormalize")
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(g, scores.float().gather(1, idx) / scores.float().gather(1, idx).sum(-1, keepdim=True))


def test_balance_and_entropy_over_real_tokens():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    w = token_weights(torch.tensor([True, True, False]), 3, probs)
    # pbar = (0.45, 0.55), fbar (top-1) = (0.5, 0.5): 2 * (0.45 * 0.5 + 0.55 * 0.5) = 1
    assert float(balance_loss(probs, w)) == pytest.approx(1.0)
    assert float(balance_loss(probs, token_weights(None, 3, probs))) == pytest.approx(2 * (1.8 / 3 * 2 / 3 + 1.2 / 3 / 3))
    logits = probs.log()
    want = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / 2
    assert float(mean_entropy(logits, w)) == pytest.approx(want, rel=1e-5)


def test_supervised_gate_loss_is_the_mean_cross_entropy_of_kept_tokens():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, -100])
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert float(supervised_gate_loss(logits, labels, torch.ones(3))) == pytest.approx(want, rel=1e-6)


def test_sample_mean_is_the_mean_of_each_samples_token_mean():
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 2.0, 4.0])  # 2 samples x 3 tokens
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # sample 0: tokens 0-1 real; sample 1: token 0 only
    assert float(sample_mean(values, w, 2)) == pytest.approx(((1 + 3) / 2 + 7) / 2)
    assert float(sample_mean(values, torch.zeros(6), 2)) == 0.0  # samples without tokens count 0
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0]]), torch.tensor([0, 0, 1, -100])
    per = [(math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2, math.log(2)]  # sample 1: token 3 ignored
    assert float(supervised_gate_loss(logits, labels, torch.ones(4), n_samples=2)) == pytest.approx(sum(per) / 2, rel=1e-6)


def test_per_token_repeats_each_sequence_and_refuses_a_bad_split():
    assert per_token(torch.tensor([3, 5]), 6).tolist() == [3, 3, 3, 5, 5, 5]
    with pytest.raises(moelora.MoeloraError, match="2 sequences do not divide the 5 tokens"):
        per_token(torch.tensor([3, 5]), 5)
