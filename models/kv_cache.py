"""Static key/value caches for KV-cached next-scale sampling.

Shapes: B batch (2B with CFG), H heads, c head dim, l tokens of one scale, L all tokens.
Every cache is allocated once (on its first write, when dtype and device are known) with a
capacity planned from the schedule, and written in place: no torch.cat growth per scale.
A captured scale step (models/var.py `scale_logits`) writes through `KVSlot`s reserved before it runs, so the
step itself holds no bookkeeping; a `BufferPool` hands the same buffers to every call of one shape.
"""
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from models.layout import scale_begin_ends


Alloc = Callable[[Tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def new_buffer(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class BufferPool:
    """An `Alloc` that hands out, call after call, the same tensors in the same order for the same shapes: the fixed
    addresses a replayed CUDA graph writes into (marked static for torch.compile). `reset` at
    the start of every call; it frees what the previous call did not use. One call at a time."""

    def __init__(self):
        self.bufs: Dict[tuple, List[torch.Tensor]] = {}
        self.used: Dict[tuple, int] = {}

    def reset(self):
        self.bufs = {key: bufs[:self.used[key]] for key, bufs in self.bufs.items() if self.used.get(key)}
        self.used = {}

    def __call__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        bufs, i = self.bufs.setdefault(key, []), self.used.get(key, 0)
        if i == len(bufs):
            bufs.append(new_buffer(shape, dtype, device))
            torch._dynamo.mark_static_address(bufs[-1])
        self.used[key] = i + 1
        return bufs[i]


class KVCache:
    """One attention layer's keys and values for the scales seen so far."""

    def __init__(self, capacity: int, alloc: Alloc = new_buffer):
        self.capacity, self.length, self.alloc = capacity, 0, alloc
        self.k_BHLc: Optional[torch.Tensor] = None
        self.v_BHLc: Optional[torch.Tensor] = None

    def allocate(self, B: int, H: int, c: int, dtype: torch.dtype, device: torch.device):
        """The buffers, once (a no-op after the first call)."""
        if self.k_BHLc is None:
            self.k_BHLc = self.alloc((B, H, self.capacity, c), dtype, device)
            self.v_BHLc = self.alloc((B, H, self.capacity, c), dtype, device)

    def reserve(self, l: int) -> int:
        """Claim the next l positions for one scale; returns where they begin."""
        begin, end = self.length, self.length + l
        if end > self.capacity:
            raise RuntimeError(f'KV cache overflow: {end} tokens > capacity {self.capacity}')
        self.length = end
        return begin

    def write(self, begin: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of one scale at [begin, begin + l); views of everything up to its end. No bookkeeping:
        traceable with static shapes per scale."""
        end = begin + k_BHlc.shape[2]
        self.k_BHLc[:, :, begin:end].copy_(k_BHlc)
        self.v_BHLc[:, :, begin:end].copy_(v_BHlc)
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    @torch.compiler.disable   # Python bookkeeping: a compiled block breaks its graph here instead of guarding on it
    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write one scale's keys/values; return views of everything cached so far."""
        B, H, l, c = k_BHlc.shape
        begin = self.reserve(l)
        self.allocate(B, H, c, k_BHlc.dtype, k_BHlc.device)
        return self.write(begin, k_BHlc, v_BHlc)

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


class KVSlot:
    """Where one block call of a captured scale step writes: a cache and a position reserved beforehand. Passed
    as a block's `kv`, its `append` only writes."""

    def __init__(self, cache: KVCache, begin: int):
        self.cache, self.begin = cache, begin

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cache.write(self.begin, k_BHlc, v_BHlc)


def reserve_slot(cache: KVCache, l: int, like: Tuple[int, int, int, torch.dtype, torch.device]) -> KVSlot:
    """Reserve one scale of l tokens in `cache`, allocated (B, H, c, dtype, device = like) if still empty."""
    cache.allocate(*like)
    return KVSlot(cache, cache.reserve(l))


def implicit_cache_capacities(patch_nums: Sequence[int], counts: Sequence[int], fill_forward: bool) -> List[int]:
    """Tokens cache t of the implicit block must hold, for t < max(counts), given fixed per-scale counts.

    Iteration t runs at scale k iff counts[k] > t. With fill_forward, cache t holds every scale up to
    the last one that runs iteration t (scales that stopped earlier contribute their last iterate);
    without it (official behaviour) it holds only the scales that ran iteration t themselves.
    """
    be = scale_begin_ends(patch_nums)
    runs_t = [[k for k, c in enumerate(counts) if c > t] for t in range(max(counts, default=0))]
    if fill_forward:
        return [be[max(runs)][1] for runs in runs_t]
    return [sum(be[k][1] - be[k][0] for k in runs) for runs in runs_t]


class IterKVCaches:
    """Per-iteration caches of the implicit block: iteration t attends to what iteration t produced before.

    Where an earlier scale j stopped before iteration t (increasing or adaptive schedules) and
    `fill_forward` is on, cache t holds j's last iterate there; off, it holds nothing for j, as the
    official code does. Caches are created the first time an iteration index is reached.
    """

    def __init__(self, patch_nums: Sequence[int], counts: Optional[Sequence[int]], fill_forward: bool = True,
                 alloc: Alloc = new_buffer):
        self.alloc = alloc
        self.begin_ends = scale_begin_ends(patch_nums)
        self.L = self.begin_ends[-1][1]
        self.fill_forward = fill_forward
        self.capacities = implicit_cache_capacities(patch_nums, counts, fill_forward) if counts is not None else None
        self.caches: Dict[int, KVCache] = {}
        # the last iterate of every finished scale; only needed where a later scale can reach a new t
        self.needs_last = fill_forward and (counts is None or any(b > a for a, b in zip(counts, counts[1:])))
        self.last = KVCache(self.L, alloc) if self.needs_last else None
        self.si = 0
        self.written_t: Set[int] = set()   # iteration indices the current scale has written

    def get(self, t: int) -> KVCache:
        """Cache for iteration t to write the current scale into (created, and prefilled, on first use). A second
        call at one (scale, t) raises: it would overflow a cache sized by the schedule, or cache the scale twice."""
        if t in self.written_t:
            raise RuntimeError(f'iteration {t} of scale {self.si} asked for its KV cache twice: a solver must call '
                               f'G(z, t) once per t (models/solver.py)')
        self.written_t.add(t)
        if t not in self.caches:
            planned = self.capacities is not None and t < len(self.capacities)
            cache = KVCache(self.capacities[t] if planned else self.L, self.alloc)
            if self.fill_forward and self.si > 0:
                cache.copy_prefix_from(self.last, self.last.length)   # < scale start if a scale ran 0 iterations
            self.caches[t] = cache
        return self.caches[t]

    def end_scale(self, iters_used: int):
        """After the current scale ran `iters_used` iterations: fill later iteration caches forward."""
        b, e = self.begin_ends[self.si]
        if iters_used > 0 and self.fill_forward:   # off: nothing to fill, and no `last` cache
            k, v = self.caches[iters_used - 1].last_scale(e - b)
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
