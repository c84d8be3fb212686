"""The LM head only where the loss is: logits for supervised positions only, with the same loss.

In instruction tuning the loss reads only response tokens (labels != -100), yet a causal LM computes logits for
every position: for SmolLM2 that is 8 x 128 x 49152 fp32 values per batch, and the head is ~20% of the model's
FLOPs per token. Here the training forward hands the head only the hidden states of positions whose next token is
supervised, and the loss is computed on those rows:

    positions = supervised_positions(labels)                  # flat indices into [batch * seq], on the host
    out = model(**batch, supervised_positions=positions)      # out.logits: [1, n, vocab]; out.loss as before

The loss equals the full-logits loss (same token set, same normalisation: `num_items_in_batch` if given, else the
number of supervised tokens). Evaluation and generation never pass positions and are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[batch * seq] targets: position t predicts labels[t + 1] (the last position predicts nothing)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions whose next token the loss reads. Computed on the host from the CPU batch
    (its size depends on the data, so on a GPU it would be a sync)."""
    return (next_token_targets(labels) != IGNORE_INDEX).nonzero().squeeze(1)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                    num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of the head's rows ([1, n, vocab], in `positions` order) against their next tokens, summed
    and divided as transformers' causal-LM loss divides (num_items_in_batch, else the supervised-token count)."""
    targets = next_token_targets(labels).index_select(0, positions.to(labels.device))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.to(logits.device), reduction="sum")
    if num_items_in_batch is None:
        return loss / max(positions.numel(), 1)
    return loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


class HeadRows:
    """A forward pre-hook on the output head that, while `rows` is set, feeds it only those rows of the hidden
    states ([batch, seq, d] -> [1, n, d]). Installed once (hooks installed inside a compiled forward would be a
    side effect); inactive (rows None) for every other forward."""

    def __init__(self, head: nn.Module | None):
        self.rows: torch.Tensor | None = None
        self.installed = head is not None
        if head is not None:
            head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.rows is None:
            return None
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows.to(hidden.device))
        return (picked.unsqueeze(0), *args[1:])
