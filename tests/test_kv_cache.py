"""IterKVCaches: which iterate of each earlier scale every per-iteration cache of the implicit block holds.

The scale loop is simulated without a model: iteration t of scale s writes keys filled with 100 * s + t (values
with its negative), so reading a cache back says, scale by scale, which iteration produced what it holds.
"""
from typing import List, Optional, Sequence

import pytest
import torch

from models import schedules as S
from models.kv_cache import BufferPool, IterKVCaches, KVCache, implicit_cache_capacities, reserve_slot
from tests.tiny import tiny_vae_var

PN = (1, 2, 3)   # scales of 1, 4 and 9 tokens: begin/end (0, 1), (1, 5), (5, 14)


def run_scales(caches: IterKVCaches, iters: Sequence[int]) -> IterKVCaches:
    """Drive the caches as VIAR's scale loop does: scale s runs iters[s] iterations, then end_scale."""
    for s, (pn, n) in enumerate(zip(PN, iters)):
        l = pn * pn
        for t in range(n):
            tag = float(100 * s + t)
            caches.get(t).append(torch.full((2, 1, l, 3), tag), torch.full((2, 1, l, 3), -tag))
        caches.end_scale(n)
    return caches


def held(cache: Optional[KVCache]) -> List[float]:
    """The tag of every cached token run, one entry per run of equal tags (i.e. per scale written), in order."""
    k = cache.k_BHLc[:, :, :cache.length]
    v = cache.v_BHLc[:, :, :cache.length]
    assert torch.equal(v, -k), 'values were not written with their keys'
    assert (k == k[:1, :1, :, :1]).all(), 'a token holds mixed tags across batch, heads or channels'
    tags = k[0, 0, :, 0].tolist()
    return [t for i, t in enumerate(tags) if i == 0 or tags[i - 1] != t]


def tokens_per_tag(cache: KVCache) -> List[int]:
    """How many tokens each run of held() covers."""
    tags = cache.k_BHLc[0, 0, :cache.length, 0].tolist()
    out = []
    for i, t in enumerate(tags):
        if i and tags[i - 1] == t:
            out[-1] += 1
        else:
            out.append(1)
    return out


def test_increasing_counts_fill_later_caches_with_the_last_iterate():
    # scale 0 runs t = 0, 1; scale 1 t = 0..2; scale 2 t = 0..3. Cache 2 first appears at scale 1 and
    # cache 3 at scale 2: each must start with the *last* iterate of the scales that stopped before it
    caches = run_scales(IterKVCaches(PN, [2, 3, 4], fill_forward=True), [2, 3, 4])
    assert held(caches.caches[0]) == [0, 100, 200]
    assert held(caches.caches[1]) == [1, 101, 201]
    assert held(caches.caches[2]) == [1, 102, 202]      # scale 0 stopped after t = 1
    assert held(caches.caches[3]) == [1, 102, 203]      # scale 1 stopped after t = 2
    assert held(caches.last) == [1, 102, 203]
    assert tokens_per_tag(caches.caches[3]) == [1, 4, 9]   # every scale at its own slot


def test_a_scale_that_stops_early_is_copied_into_caches_later_iterations_already_made():
    # scale 0 makes caches 0..2; scale 1 runs only t = 0, so cache 1 (which scale 2 reads at t = 1) must get
    # scale 1's t = 0 iterate at scale 1's slot; cache 2 is never read past scale 0 (capacity 1 token)
    caches = run_scales(IterKVCaches(PN, [3, 1, 2], fill_forward=True), [3, 1, 2])
    assert held(caches.caches[0]) == [0, 100, 200]
    assert held(caches.caches[1]) == [1, 100, 201]
    assert tokens_per_tag(caches.caches[1]) == [1, 4, 9]
    assert held(caches.caches[2]) == [2]
    assert held(caches.last) == [2, 100, 201]


def test_adaptive_stops_are_filled_forward_from_each_scales_last_iterate():
    # counts=None: an adaptive schedule, whose stops (here 2, 1, 3) are only known as the scales run
    caches = run_scales(IterKVCaches(PN, None, fill_forward=True), [2, 1, 3])
    assert held(caches.caches[0]) == [0, 100, 200]
    assert held(caches.caches[1]) == [1, 100, 201]      # scale 1 stopped after t = 0
    assert held(caches.caches[2]) == [1, 100, 202]      # made at scale 2 from scale 0's t = 1 and scale 1's t = 0
    assert held(caches.last) == [1, 100, 202]


def test_without_fill_forward_a_cache_holds_only_the_scales_that_ran_its_iteration():
    caches = run_scales(IterKVCaches(PN, [2, 3, 4], fill_forward=False), [2, 3, 4])
    assert held(caches.caches[1]) == [1, 101, 201]
    assert held(caches.caches[2]) == [102, 202] and tokens_per_tag(caches.caches[2]) == [4, 9]
    assert held(caches.caches[3]) == [203] and tokens_per_tag(caches.caches[3]) == [9]
    assert caches.last is None


def test_cache_capacities_and_bytes_follow_the_schedule():
    pn = (1, 2, 3, 4)
    assert implicit_cache_capacities(pn, [3, 2, 1, 1], True) == [30, 5, 1]
    assert implicit_cache_capacities(pn, [1, 3, 2, 3], False) == [30, 29, 20]
    assert implicit_cache_capacities(pn, [1, 3, 2, 3], True) == [30, 30, 30]
    _, var = tiny_vae_var(True)
    sizes = [var.autoregressive_infer_cfg(1, 0, schedule=s, return_stats=True)[1].kv_cache_bytes
             for s in (S.constant(1, 4), S.decreasing(3, 1, 4), S.constant(3, 4))]
    assert sizes[0] < sizes[1] < sizes[2]


class CatKVCache:
    """Reference cache that grows by torch.cat (the layout of the official code), with KVCache's interface."""

    def __init__(self, capacity: int, alloc=None):   # alloc: unused, this cache grows
        self.capacity, self.length = capacity, 0
        self.k_BHLc = self.v_BHLc = None

    def append(self, k_BHlc, v_BHlc):
        self.k_BHLc = k_BHlc if self.k_BHLc is None else torch.cat((self.k_BHLc, k_BHlc), dim=2)
        self.v_BHLc = v_BHlc if self.v_BHLc is None else torch.cat((self.v_BHLc, v_BHlc), dim=2)
        self.length = self.k_BHLc.shape[2]
        return self.k_BHLc, self.v_BHLc

    def copy_prefix_from(self, other, upto: int):
        if upto > 0:
            self.append(other.k_BHLc[:, :, :upto], other.v_BHLc[:, :, :upto])

    def last_scale(self, l: int):
        return self.k_BHLc[:, :, -l:], self.v_BHLc[:, :, -l:]

    def nbytes(self) -> int:
        return 0


def record_attention(var, sample):
    """Every attention call of one sample: (cached keys, cached values, attention output), cloned as it ran."""
    calls = []

    def hook(module, args, out):
        kv = args[2]
        calls.append((kv.k_BHLc[:, :, :kv.length].clone(), kv.v_BHLc[:, :, :kv.length].clone(), out.clone()))
    handles = [b.attn.register_forward_hook(hook) for b in var.backbone_blocks()]
    try:
        img = sample()
    finally:
        for h in handles:
            h.remove()
    return img, calls


@pytest.mark.parametrize('use_implicit,schedule,fill_forward', [
    (False, None, True), (True, S.decreasing(3, 1, 4), True), (True, S.adaptive(0.3, 6, 4), True),
    (True, S.adaptive(0.3, 6, 4), False), (True, S.explicit([1, 3, 2, 3], 4), True)])
def test_in_place_caches_hold_and_attend_exactly_what_concatenated_caches_do(monkeypatch, use_implicit, schedule,
                                                                             fill_forward):
    _, var = tiny_vae_var(use_implicit)
    sample = lambda: var.autoregressive_infer_cfg(2, None, g_seed=3, cfg=1.5, top_k=10, schedule=schedule,  # noqa: E731
                                                  fill_forward=fill_forward, return_stats=True)
    (img, stats), calls = record_attention(var, sample)
    for module in ('models.kv_cache', 'models.var', 'models.viar'):
        monkeypatch.setattr(f'{module}.KVCache', CatKVCache)
    (ref_img, ref_stats), ref_calls = record_attention(var, sample)
    assert stats.iters == ref_stats.iters and len(calls) == len(ref_calls) > 0
    if schedule is not None and schedule.adaptive:
        assert len(set(stats.iters)) > 1, 'the adaptive schedule should stop scales at different iterations'
    for i, (got, ref) in enumerate(zip(calls, ref_calls)):
        for name, a, b in zip(('keys', 'values', 'attention output'), got, ref):
            assert a.shape == b.shape and torch.equal(a, b), f'attention call {i}: {name} differ'
    assert torch.equal(img, ref_img)


def test_slots_reserved_before_a_scale_write_what_appending_writes():
    """A captured step's caches: the slots reserved scale by scale (the bookkeeping before the step), then written
    (the step), hold what append holds and return the same views."""
    kv_ref, kv = KVCache(14), KVCache(14)
    for pn in PN:
        k, v = torch.randn(2, 3, pn * pn, 4), torch.randn(2, 3, pn * pn, 4)
        slot = reserve_slot(kv, pn * pn, (2, 3, 4, k.dtype, k.device))
        got, want = slot.append(k, v), kv_ref.append(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and kv.length == kv_ref.length
    with pytest.raises(RuntimeError, match='overflow'):
        reserve_slot(kv, 1, (2, 3, 4, k.dtype, k.device))


def test_buffer_pool_hands_the_same_buffers_to_every_call_of_one_shape():
    """What CUDA graphs replay into: the same addresses call after call; a call of another shape gets its own,
    and a reset frees what the previous call did not use."""
    pool = BufferPool()
    call = lambda shapes: [pool(s, torch.float32, 'cpu') for s in shapes]  # noqa: E731
    first = call([(2, 3), (2, 3), (4,)])
    pool.reset()
    again = call([(2, 3), (2, 3), (4,)])
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in first]
    assert again[0].data_ptr() != again[1].data_ptr()   # two caches of one shape in one call: two buffers
    pool.reset()
    other = call([(5,)])
    assert [t.shape for t in other] == [(5,)] and sum(map(len, pool.bufs.values())) == 4
    pool.reset()
    assert list(pool.bufs) == [((5,), torch.float32, torch.device('cpu'))]   # the unused shapes are freed


@pytest.mark.parametrize('use_implicit', [False, True])
def test_sampling_on_pooled_slots_equals_sampling_on_fresh_caches(use_implicit):
    """The captured step's path run eagerly (scale_logits as scale_step, caches from a pool, twice: the second call
    reuses the first's buffers) samples what the plain scale loop samples, with the same stats."""
    _, var = tiny_vae_var(use_implicit)
    pool = BufferPool()
    for schedule, fill in ((S.explicit([1, 3, 2, 3], 4), True), (S.explicit([1, 3, 2, 3], 4), False),
                           (S.constant(2, 4), True)):
        kw = dict(g_seed=3, cfg=1.5, top_k=10, schedule=schedule, fill_forward=fill, return_stats=True, fast=True)
        ref, ref_st = var.autoregressive_infer_cfg(2, None, **kw)
        for _ in range(2):
            pool.reset()
            img, st = var.autoregressive_infer_cfg(2, None, scale_step=var.scale_logits, alloc=pool, **kw)
            assert torch.equal(img, ref)
            assert (st.iters, st.residuals, st.kv_cache_bytes) == (ref_st.iters, ref_st.residuals, ref_st.kv_cache_bytes)
    assert pool.bufs, 'nothing was allocated from the pool'
