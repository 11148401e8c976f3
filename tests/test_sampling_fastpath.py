"""Sampling fast paths: a fixed schedule's scale loop never reads a device value back (adaptive reads one per
iteration), and cfg == 0 runs only the conditional half yet samples what the guided path samples at vanishing cfg."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import schedules as S
from models.kv_cache import implicit_cache_capacities
from models.layout import num_tokens
from tests.tiny import tiny_vae_var

# ops that copy a device value to the host (a CUDA sync) or whose output shape depends on values
SYNC_OPS = {'_local_scalar_dense', 'item', 'nonzero', 'is_nonzero', 'equal', 'masked_select', 'unique', '_unique2'}


class OpLog(TorchDispatchMode):
    """Records the name of every aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _sync_positions(var, **kw):
    with torch.no_grad(), OpLog() as log:
        _, stats = var.autoregressive_infer_cfg(2, kw.pop('label_B', torch.tensor([0, 3])), return_stats=True, **kw)
    syncs = [i for i, op in enumerate(log.ops) if op in SYNC_OPS]
    last_draw = max(i for i, op in enumerate(log.ops) if op == 'multinomial')
    return syncs, last_draw, stats


@pytest.mark.parametrize('use_implicit', [False, True])
@pytest.mark.parametrize('seeds', [5, [1, 2]])
def test_fixed_schedule_loop_has_no_sync(use_implicit, seeds):
    _, var = tiny_vae_var(use_implicit)
    syncs, last_draw, stats = _sync_positions(var, g_seed=seeds, cfg=1.5, top_k=10, top_p=0.9,
                                              schedule=S.decreasing(3, 1, 4), label_B=None)
    inside = [i for i in syncs if i < last_draw]
    assert inside == [], 'a host read inside the scale loop'
    assert len(syncs) == (len(stats.residuals) if use_implicit else 0)   # residuals read once, after the loop


def test_adaptive_schedule_reads_one_residual_per_iteration():
    _, var = tiny_vae_var(True)
    syncs, last_draw, stats = _sync_positions(var, g_seed=5, cfg=1.5, top_k=10, top_p=0.9,
                                              schedule=S.adaptive(0.05, 3, 4))
    inside = [i for i in syncs if i < last_draw]
    assert len(inside) == sum(stats.iters)


@pytest.mark.parametrize('use_implicit', [False, True])
def test_cfg_zero_skips_the_unconditional_half(use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    kw = dict(g_seed=[4, 9], top_k=10, top_p=0.9, schedule=S.decreasing(3, 1, 4), return_stats=True)
    runs = {}
    for cfg in (0.0, 1e-30):   # 1e-30: the 2B-row guided path, whose guided logits round to the conditional ones
        toks = []
        h = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
        with torch.no_grad():
            img, stats = var.autoregressive_infer_cfg(2, torch.tensor([1, 3]), cfg=cfg, **kw)
        h.remove()
        runs[cfg] = (toks, img, stats)
    (toks0, img0, st0), (toks1, img1, st1) = runs[0.0], runs[1e-30]
    assert len(toks0) == 4 and all(torch.equal(a, b) for a, b in zip(toks0, toks1))
    torch.testing.assert_close(img0, img1, atol=1e-5, rtol=1e-5)
    assert st0.kv_cache_bytes * 2 == st1.kv_cache_bytes   # half the rows in every cache


def planned_kv_bytes(patch_nums, explicit_layers: int, counts, rows: int, width: int, elem_bytes: int,
                     fill_forward: bool = True) -> int:
    """Bytes the KV caches of one sampling call hold, from the schedule alone: each explicit layer caches all L
    tokens; the implicit block (counts given) one cache per iteration index, plus an L-token cache of last iterates
    when some scale runs more iterations than an earlier one (fill_forward). rows: 2B with CFG."""
    L = num_tokens(patch_nums)
    tokens = explicit_layers * L
    if counts is not None:
        tokens += sum(implicit_cache_capacities(patch_nums, counts, fill_forward))
        if fill_forward and any(b > a for a, b in zip(counts, counts[1:])):
            tokens += L
    return 2 * rows * width * elem_bytes * tokens


@pytest.mark.parametrize('counts,fill_forward', [(None, True), ([3, 3, 3, 3], True), ([4, 3, 1, 1], True),
                                                 ([1, 2, 1, 3], True), ([1, 2, 1, 3], False), ([0, 2, 2, 0], True)])
def test_planned_kv_bytes_equal_what_sampling_allocates(counts, fill_forward):
    _, var = tiny_vae_var(counts is not None)
    sched = S.explicit(counts, 4) if counts else None
    with torch.no_grad():
        _, st = var.autoregressive_infer_cfg(3, torch.tensor([0, 1, 2]), g_seed=1, cfg=1.5, top_k=5, schedule=sched,
                                             fill_forward=fill_forward, return_stats=True)
    explicit = len(var.backbone_blocks()) - (counts is not None)
    assert st.kv_cache_bytes == planned_kv_bytes(var.patch_nums, explicit, counts, rows=6, width=var.C, elem_bytes=4,
                                                 fill_forward=fill_forward)


def test_scale_with_zero_iterations_contributes_no_implicit_keys():
    _, var = tiny_vae_var(True)
    outs = []
    for ff in (True, False):   # scale 0 has no iterate, so filling forward has nothing to add: both agree
        with torch.no_grad():
            outs.append(var.autoregressive_infer_cfg(2, torch.tensor([0, 1]), g_seed=1, top_k=5,
                                                     schedule=S.explicit([0, 2, 2, 0], 4), fill_forward=ff))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize('use_implicit', [False, True])
def test_kv_caches_are_freed_before_the_decode(use_implicit):
    """The VQVAE decode (the largest activations of a call) must not run while the KV caches are alive:
    every cache a block wrote is garbage by the time the decoder starts (the official code drops its
    caches too), so on a GPU the decode reuses their memory instead of adding to the peak."""
    import weakref
    from models.kv_cache import KVCache
    vae, var = tiny_vae_var(use_implicit)
    caches, alive_at_decode = [], []

    def remember(module, args, kwargs):
        caches.extend(weakref.ref(a) for a in list(args) + list(kwargs.values()) if isinstance(a, KVCache))

    hooks = [b.register_forward_pre_hook(remember, with_kwargs=True) for b in var.backbone_blocks()]
    hooks.append(vae.decoder.register_forward_pre_hook(
        lambda m, a: alive_at_decode.extend(r for r in caches if r() is not None)))
    try:
        with torch.no_grad():
            var.autoregressive_infer_cfg(2, torch.tensor([0, 3]), g_seed=1, cfg=1.5, top_k=5,
                                         schedule=S.explicit([2, 3, 1, 2], 4))
    finally:
        for h in hooks:
            h.remove()
    assert caches, 'no block received a KV cache'
    assert not alive_at_decode, f'{len(alive_at_decode)} of {len(caches)} KV caches alive during the decode'
