"""Static key/value caches for KV-cached next-scale sampling.

Shapes: B batch (2B with CFG), H heads, c head dim, l tokens of one scale, L all tokens.
Every cache is allocated once (on its first write, when dtype and device are known) with a
capacity planned from the schedule, and written in place: no torch.cat growth per scale.
"""
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from models.layout import scale_begin_ends


class KVCache:
    """One attention layer's keys and values for the scales seen so far."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k_BHLc: Optional[torch.Tensor] = None
        self.v_BHLc: Optional[torch.Tensor] = None

    @torch.compiler.disable   # Python bookkeeping: a compiled block breaks its graph here instead of guarding on it
    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write one scale's keys/values; return views of everything cached so far."""
        l = k_BHlc.shape[2]
        end = self.length + l
        if end > self.capacity:
            raise RuntimeError(f'KV cache overflow: {end} tokens > capacity {self.capacity}')
        if self.k_BHLc is None:
            B, H, _, c = k_BHlc.shape
            self.k_BHLc = k_BHlc.new_empty(B, H, self.capacity, c)
            self.v_BHLc = v_BHlc.new_empty(B, H, self.capacity, c)
        self.k_BHLc[:, :, self.length:end].copy_(k_BHlc)
        self.v_BHLc[:, :, self.length:end].copy_(v_BHlc)
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    def copy_prefix_from(self, other: 'KVCache', upto: int):
        """Start this (empty) cache with the first `upto` tokens of another."""
        if upto > 0:
            self.append(other.k_BHLc[:, :, :upto], other.v_BHLc[:, :, :upto])

    def last_scale(self, l: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The most recent `l` cached tokens (the scale just written)."""
        return self.k_BHLc[:, :, self.length - l:self.length], self.v_BHLc[:, :, self.length - l:self.length]

    def nbytes(self) -> int:
        """Bytes held by the preallocated buffers."""
        if self.k_BHLc is None:
            return 0
        return 2 * self.k_BHLc.numel() * self.k_BHLc.element_size()


def implicit_cache_capacities(patch_nums: Sequence[int], counts: Sequence[int], fill_forward: bool) -> List[int]:
    """Tokens cache t of the implicit block must hold, for t < max(counts), given fixed per-scale counts.

    Iteration t runs at scale k iff counts[k] > t. With fill_forward, cache t holds every scale up to
    the last one that runs iteration t (scales that stopped earlier contribute their last iterate);
    without it (official behaviour) it holds only the scales that ran iteration t themselves.
    """
    be = scale_begin_ends(patch_nums)
    caps = []
    for t in range(max(counts, default=0)):
        runs = [k for k, c in enumerate(counts) if c > t]
        if fill_forward:
            caps.append(be[max(runs)][1])
        else:
            caps.append(sum(be[k][1] - be[k][0] for k in runs))
    return caps


class IterKVCaches:
    """Per-iteration caches of the implicit block: iteration t attends to what iteration t produced before.

    Where an earlier scale j stopped before iteration t (increasing or adaptive schedules) and
    `fill_forward` is on, cache t holds j's last iterate there; off, it holds nothing for j, as the
    official code does. Caches are created the first time an iteration index is reached.
    A solver calls G once per iteration index of a scale (models/solver.py): `get` refuses a second (scale, t).
    """

    def __init__(self, patch_nums: Sequence[int], counts: Optional[Sequence[int]], fill_forward: bool = True):
        self.begin_ends = scale_begin_ends(patch_nums)
        self.L = self.begin_ends[-1][1]
        self.fill_forward = fill_forward
        self.capacities = implicit_cache_capacities(patch_nums, counts, fill_forward) if counts is not None else None
        self.caches: Dict[int, KVCache] = {}
        # the last iterate of every finished scale; only needed where a later scale can reach a new t
        self.needs_last = fill_forward and (counts is None or any(b > a for a, b in zip(counts, counts[1:])))
        self.last = KVCache(self.L) if self.needs_last else None
        self.si = 0
        self.written_t: Set[int] = set()   # iteration indices the current scale has written

    def _capacity(self, t: int) -> int:
        if self.capacities is not None and t < len(self.capacities):
            return self.capacities[t]
        return self.L

    def get(self, t: int) -> KVCache:
        """Cache for iteration t to write the current scale into (created, and prefilled, on first use).

        A second write of one (scale, t) would overflow a cache sized by the schedule, or leave the scale's keys
        twice in one grown to L: it raises instead."""
        if t in self.written_t:
            raise RuntimeError(f'iteration {t} of scale {self.si} asked for its KV cache twice: a solver must call '
                               f'G(z, t) once per t (models/solver.py)')
        self.written_t.add(t)
        if t not in self.caches:
            cache = KVCache(self._capacity(t))
            if self.fill_forward and self.si > 0:
                cache.copy_prefix_from(self.last, self.last.length)   # < scale start if a scale ran 0 iterations
            self.caches[t] = cache
        return self.caches[t]

    def end_scale(self, iters_used: int):
        """After the current scale ran `iters_used` iterations: fill later iteration caches forward."""
        b, e = self.begin_ends[self.si]
        if iters_used > 0 and (self.fill_forward or self.needs_last):
            k, v = self.caches[iters_used - 1].last_scale(e - b)
            if self.fill_forward:
                for t, cache in self.caches.items():
                    if t >= iters_used and cache.length < e and cache.capacity >= e:
                        cache.append(k, v)
            if self.last is not None:
                self.last.append(k, v)
        self.si += 1
        self.written_t.clear()

    def nbytes(self) -> int:
        """Bytes held by all per-iteration caches (and the last-iterate cache)."""
        return sum(c.nbytes() for c in self.caches.values()) + (self.last.nbytes() if self.last else 0)
