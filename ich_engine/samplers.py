"""Batch samplers for datasets whose items must not share a batch across groups.

Report generation feeds a CT volume and a chest film through different towers with different
prompts, so one batch must hold one modality. :class:`GroupedBatchSampler` makes such batches; the
engine uses it for any dataset with a ``group_keys`` attribute (one hashable key per item).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of at most ``batch_size`` indices that share a group key, for one DDP rank.

    Each group is cut into batches on its own (its last batch may be short: ``drop_last=False``
    semantics). With ``shuffle`` the items within each group and then the order of all batches are
    permuted by a generator seeded with ``seed + epoch`` (call :meth:`set_epoch` each epoch), so every
    rank computes the same permutation and a resumed run draws the same batches as an uninterrupted
    one. Rank ``r`` of ``num_replicas`` takes every ``num_replicas``-th batch from ``r``. When the batch
    count does not divide evenly, the first batches are repeated to fill the last round, as
    ``DistributedSampler`` repeats items: every rank runs the same number of steps (DDP's gradient
    all-reduce would otherwise wait forever), and only those padding batches are seen twice.
    """

    def __init__(
        self,
        group_keys: Sequence[Hashable],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(group_keys):
            self.groups.setdefault(key, []).append(index)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        total = sum(-(-len(indices) // batch_size) for indices in self.groups.values())
        self.num_batches = -(-total // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, padded to a multiple of ``num_replicas``."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for indices in self.groups.values():  # insertion order: the first item of each group decides
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += [indices[start : start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        padding = self.num_batches * self.num_replicas - len(batches)
        return batches + (batches * (padding // max(len(batches), 1) + 1))[:padding]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches
