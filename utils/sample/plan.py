"""The global plan of `sampling.py`: which images each batch makes, with which label and seed, and file names.

Image index i = class * per_class + j (class-major). A batch is a contiguous chunk of one class's images,
so its label is constant, and its seed is a pure function of (seed, class, chunk): the images do not depend
on how many processes share the plan. Every function here is pure arithmetic on integers and strings.
"""
import os
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One sampling call: `size` images of class `label`, indices start .. start + size - 1, generator seed `seed`."""
    order: int      # position in the global plan
    label: int
    chunk: int      # chunk number inside the class
    start: int      # global index of the first image
    size: int
    seed: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.size)


def batch_seed(seed: int, label: int, chunk: int) -> int:
    """A distinct, well-mixed 63-bit generator seed for every (seed, class, chunk)."""
    state = np.random.SeedSequence([seed, label, chunk]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1   # torch.Generator.manual_seed takes any int below 2**64; keep it positive in any int64


def official_batch_seed(seed: int, label: int, chunk: int) -> int:
    """The official sampling.py rule: `seed + chunk` for every class, so all classes share the same noise streams."""
    return seed + chunk


def make_plan(num_classes: int, per_class: int, batch_size: int, seed: int = 1,
              official_seeds: bool = False) -> List[Batch]:
    """All batches in global order (class-major, then chunk); the last chunk of a class may be smaller."""
    for name, value in (('num_classes', num_classes), ('per_class', per_class), ('batch_size', batch_size)):
        if int(value) < 1:
            raise ValueError(f'--{name} must be >= 1, got {value}')
    if seed < 0:
        raise ValueError(f'--seed must be >= 0, got {seed}')
    seed_fn = official_batch_seed if official_seeds else batch_seed
    plan = []
    for label in range(num_classes):
        for chunk, j in enumerate(range(0, per_class, batch_size)):
            plan.append(Batch(order=len(plan), label=label, chunk=chunk, start=label * per_class + j,
                              size=min(batch_size, per_class - j), seed=seed_fn(seed, label, chunk)))
    return plan


def rank_share(plan: Sequence[Batch], rank: int, world_size: int) -> List[Batch]:
    """Round-robin split: rank r takes batches r, r + W, r + 2W, ... of `plan`."""
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} outside world size {world_size}')
    return list(plan[rank::world_size])


def png_name(index: int) -> str:
    """File name of image `index`, as the official script names it."""
    return f'{index:06d}.png'


def run_name_head(kind: str, depth: int) -> str:
    """Head of the official sample-folder name: 'implicit' for a VIAR, 'd<depth>' for a VAR."""
    return 'implicit' if kind == 'VIAR' else f'd{depth}'


def sample_folder_name(head: str, ckpt_path: str, cfg: float, seed: int) -> str:
    """Official folder name <head>-<ckpt basename>-cfg-<cfg>-seed-<seed>; head: `run_name_head`."""
    return f'{head}-{os.path.basename(ckpt_path)}-cfg-{float(cfg)}-seed-{seed}'
