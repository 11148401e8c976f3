"""Batch samplers: an infinite, resumable, distributed training sampler and a contiguous eval split.

Training order is a pure function of (seed, epoch, batch index): epoch e shuffles the dataset with a
generator seeded by (seed, e), pads the last global batch with the first indices of the permutation
(official `fill_last`), and rank r takes slice r of every global batch. So the images of a global batch
do not depend on the world size, and a sampler started at (epoch, it) yields exactly what an
uninterrupted one would from there. Every index comes with a per-sample augmentation seed.
"""
import math
from typing import Dict, Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

_MIX = 0x9E3779B97F4A7C15


def epoch_permutation(seed: int, epoch: int, dataset_len: int) -> List[int]:
    """The global order of epoch `epoch` (same on every rank)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(dataset_len, generator=g).tolist()


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the sample at `position` of epoch `epoch`."""
    return (seed * _MIX + epoch * 1_000_003 + position) % (2 ** 63)


class DistInfiniteBatchSampler(Sampler):
    """Endless local batches of (index, aug seed), from position (0, 0) or load_state_dict's. A DataLoader's workers
    run ahead of the loop, so a run resumes from `position_at(step)`, not from this sampler's own position."""

    def __init__(self, dataset_len: int, glb_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if glb_batch_size % world_size != 0:
            raise ValueError(f'global batch {glb_batch_size} is not divisible by world size {world_size}')
        if dataset_len <= 0:
            raise ValueError('the training set is empty')
        self.dataset_len, self.glb_batch_size = dataset_len, glb_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size = glb_batch_size // world_size
        self.iters_per_epoch = math.ceil(dataset_len / glb_batch_size)
        self.epoch, self.it = 0, 0

    def __len__(self) -> int:
        return self.iters_per_epoch

    def position_at(self, g_it: int) -> Dict[str, int]:
        """(epoch, it) of global batch number g_it counted from the very start."""
        return {'epoch': g_it // self.iters_per_epoch, 'it': g_it % self.iters_per_epoch}

    def local_batch(self, epoch: int, it: int, perm: List[int]) -> List[Tuple[int, int]]:
        """This rank's (index, aug seed) items of global batch (epoch, it): its slice of the batch's positions, the
        last batch of an epoch wrapping to the start of the permutation."""
        start = it * self.glb_batch_size + self.rank * self.batch_size
        positions = range(start, start + self.batch_size)
        return [(perm[pos % len(perm)], sample_seed(self.seed, epoch, pos)) for pos in positions]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        while True:
            perm = epoch_permutation(self.seed, self.epoch, self.dataset_len)
            while self.it < self.iters_per_epoch:
                batch = self.local_batch(self.epoch, self.it, perm)
                self.it += 1
                yield batch
            self.epoch, self.it = self.epoch + 1, 0

    def load_state_dict(self, position: Dict[str, int]):
        """Continue from a position_at() (takes effect at the next iter())."""
        self.epoch, self.it = int(position['epoch']), int(position['it'])


class EvalDistributedSampler(Sampler):
    """Rank r evaluates the contiguous slice r of the dataset (no padding, no duplicates)."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        b = dataset_len * rank // world_size
        e = dataset_len * (rank + 1) // world_size
        self.indices = list(range(b, e))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
