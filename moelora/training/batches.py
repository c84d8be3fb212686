"""Deterministic micro-batch order, so a resumed run sees exactly the batches it would have seen.

Micro-batch m (counted over the whole run, all processes together) takes the m-th slice of
`world * per_device` examples of a per-epoch permutation seeded by (seed, epoch); process `rank`
takes its own part of that slice. No sampler state needs saving: the counter m is enough.
"""

from __future__ import annotations

import torch


class BatchOrder:
    def __init__(self, n_examples: int, per_device: int, world: int = 1, rank: int = 0, seed: int = 0):
        self.global_batch = per_device * world
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
            self._perm, self._epoch = torch.randperm(self.n, generator=gen).tolist(), epoch
        start = pos * self.global_batch + self.rank * self.per_device
        return self._perm[start:start + self.per_device]
