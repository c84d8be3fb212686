"""Deterministic micro-batch order, so a resumed run sees exactly the batches it would have seen.

Micro-batch m (counted over the whole run, all processes together) takes the m-th slice of
`world * per_device` examples of a per-epoch permutation seeded by (seed, epoch); process `rank`
takes its own part of that slice. No sampler state needs saving: the counter m is enough.

With `lengths` (the run's `group_by_length`, as Hugging Face's): the permutation is cut into megabatches of 50
global batches, each sorted by length, and the global batches they make are shuffled again, so a batch holds
examples of similar length (less padding: every padded position costs a full forward and backward) and the
batches still come in random order.
"""

from __future__ import annotations

from typing import Sequence

import torch

MEGABATCH = 50  # global batches per length-sorted megabatch (Hugging Face's LengthGroupedSampler uses 50)


class BatchOrder:
    def __init__(self, n_examples: int, per_device: int, world: int = 1, rank: int = 0, seed: int = 0,
                 lengths: Sequence[int] | None = None):
        self.global_batch = per_device * world
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"{len(lengths)} lengths for {n_examples} examples")
        self.lengths = lengths
        if n_examples < self.global_batch:
            from ..errors import DataError

            raise DataError(f"only {n_examples} training examples for a global batch of {self.global_batch} "
                            f"(per_device_train_batch_size x processes); add data or lower the batch size")
        self.n, self.per_device, self.rank, self.seed = n_examples, per_device, rank, seed
        self.batches_per_epoch = n_examples // self.global_batch  # the ragged tail is dropped, as drop_last
        self._epoch, self._perm = -1, None

    def epoch_of(self, micro_step: int) -> float:
        return micro_step / self.batches_per_epoch

    def indices(self, micro_step: int) -> list[int]:
        epoch, pos = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            self._perm, self._epoch = (perm if self.lengths is None else self._grouped(perm, gen)), epoch
        start = pos * self.global_batch + self.rank * self.per_device
        return self._perm[start:start + self.per_device]

    def _grouped(self, perm: list[int], gen: torch.Generator) -> list[int]:
        """`perm` regrouped into global batches of similar length, in random batch order (whole batches only)."""
        size = MEGABATCH * self.global_batch
        batches = []
        for start in range(0, len(perm), size):
            mega = sorted(perm[start:start + size], key=lambda i: -self.lengths[i])  # stable: ties keep perm's order
            batches += [mega[k:k + self.global_batch] for k in range(0, len(mega) - self.global_batch + 1, self.global_batch)]
        return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
