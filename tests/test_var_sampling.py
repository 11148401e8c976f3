"""KV-cached next-scale sampling (models/var.py, models/viar.py): equals teacher forcing, schedules, determinism,
CFG, editing; a fixed schedule's scale loop reads nothing back from the device; cfg 0 runs only the conditional half."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import EditSpec
from models import schedules as S
from models.kv_cache import implicit_cache_capacities
from tests.tiny import tiny_vae_var
from models.layout import num_tokens


def sample_and_capture(var, B, labels, **kw):
    """Run sampling; return (images, raw head logits per scale (2B,l,V), sampled tokens per scale, stats)."""
    logits, tokens = [], []
    h1 = var.head.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))
    h2 = var.vae_quant_proxy[0].embedding.register_forward_pre_hook(lambda m, i: tokens.append(i[0].clone()))
    try:
        img, stats = var.autoregressive_infer_cfg(B, labels, return_stats=True, **kw)
    finally:
        h1.remove()
        h2.remove()
    return img, logits, tokens, stats


@pytest.mark.parametrize('use_implicit,c', [(False, 0), (True, 1), (True, 3)])
def test_cached_sampling_logits_equal_teacher_forcing(use_implicit, c):
    vae, var = tiny_vae_var(use_implicit)
    var.cond_drop_rate = 0.0
    B, labels = 3, torch.tensor([0, 2, 4])
    _, logits, tokens, stats = sample_and_capture(var, B, labels, g_seed=7, cfg=1.0, schedule=S.constant(c, 4))
    x = vae.quantize.idxBl_to_var_input(tokens)
    with torch.no_grad():
        tf_cond = var(labels, x, jfb_iters=(c - 1, 1) if use_implicit else None)
        tf_null = var(torch.full_like(labels, var.num_classes), x, jfb_iters=(0, c) if use_implicit else None)
    cached = torch.cat(logits, dim=1)
    assert torch.allclose(cached[:B], tf_cond, atol=1e-5, rtol=1e-4)
    assert torch.allclose(cached[B:], tf_null, atol=1e-5, rtol=1e-4)
    if use_implicit:
        assert stats.iters == [c] * 4


def test_adaptive_schedule_on_the_model_reports_iterations():
    _, var = tiny_vae_var(True)
    _, st_loose = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(1e9, 5, 4), return_stats=True)
    _, st_tight = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(0.0, 5, 4), return_stats=True)
    assert st_loose.iters == [1] * 4 and st_tight.iters == [5] * 4
    assert all(r is not None and r >= 0 for r in st_tight.residuals)
    taus = [st_tight.residuals[0] * 1.01] * 4
    _, st = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(taus, 5, 4), return_stats=True)
    assert st.iters[0] <= 5 and all(1 <= i <= 5 for i in st.iters)


@pytest.mark.parametrize('use_implicit', [False, True])
def test_greedy_is_deterministic_and_seeds_reproduce(use_implicit):
    _, var = tiny_vae_var(use_implicit)
    a = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=1, top_k=1, schedule=S.decreasing(3, 1, 4))
    b = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=99, top_k=1, schedule=S.decreasing(3, 1, 4))
    assert torch.equal(a, b)
    c = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=5, top_k=0, top_p=0.9)
    d = var.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=5, top_k=0, top_p=0.9)
    assert torch.equal(c, d)
    assert c.min() >= 0 and c.max() <= 1 and c.shape == (2, 3, 8, 8)


def test_cfg_zero_equals_the_conditional_model():
    vae, var = tiny_vae_var(True)
    var.cond_drop_rate = 0.0
    labels = torch.tensor([3, 0])
    _, _, tokens, _ = sample_and_capture(var, 2, labels, cfg=0.0, top_k=1, schedule=S.constant(2, 4))
    with torch.no_grad():
        tf = var(labels, vae.quantize.idxBl_to_var_input(tokens), jfb_iters=(0, 2))
    assert torch.equal(tf.argmax(-1), torch.cat(tokens, 1))


def per_scale_iteration_reference(var, counts, fill_forward: bool):
    """A full-sequence stand-in for VIAR's backbone that runs scale j's implicit iterations counts[j] times.

    Iteration t runs G over every token under the block-causal mask; a scale that has stopped (counts[j] <= t)
    keeps its last input z^j_{counts[j]-1}, so later scales attend to the keys of its last iterate (fill-forward).
    Without fill-forward, a scale running iteration t sees no scale that did not run it (the official behaviour).
    Assigned to `var.train_backbone`, teacher forcing then computes what KV-cached sampling should.
    """
    scale_L = torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16)   # the scale of every token of pyramid 1_2_3_4
    assert len(scale_L) == var.L
    runs_for = torch.tensor(counts)[scale_L]                 # (L,) iterations each token's scale runs

    def backbone(x_BLC, ada, attn_bias, jfb_iters, path_keep_K2B=None):
        ada_pre, ada_imp, ada_post = var._split(ada)
        for block, a in zip(var.pre_blocks, ada_pre):
            x_BLC = block(x_BLC, a, attn_bias)
        z_in, z_out = x_BLC, x_BLC
        for t in range(max(counts)):
            bias = attn_bias.clone()
            if not fill_forward:                             # rows still iterating ignore scales that stopped
                bias[:, :, (runs_for > t)[:, None] & (runs_for <= t)[None, :]] = -torch.inf
            out = var.implicit_step(z_in, x_BLC, ada_imp, bias)
            z_out = torch.where((runs_for > t)[:, None], out, z_out)
            z_in = torch.where((runs_for > t + 1)[:, None], out, z_in)
        for block, a in zip(var.post_blocks, ada_post):
            z_out = block(z_out, a, attn_bias)
        return z_out
    return backbone


def reference_logits(var, counts, fill_forward: bool, labels, tokens):
    """(cond, uncond) logits of teacher forcing through per_scale_iteration_reference on the sampled tokens."""
    x = var.vae_quant_proxy[0].idxBl_to_var_input(tokens)
    var.train_backbone = per_scale_iteration_reference(var, counts, fill_forward)
    try:
        with torch.no_grad():
            return var(labels, x), var(torch.full_like(labels, var.num_classes), x)
    finally:
        del var.train_backbone


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize('schedule', [S.explicit([1, 2, 3, 4], 4), S.explicit([2, 1, 3, 2], 4),
                                      S.explicit([3, 3, 2, 1], 4), S.adaptive(0.3, 6, 4)])
@pytest.mark.parametrize('fill_forward', [True, False])
def test_cached_sampling_attends_to_each_scales_last_iterate(schedule, fill_forward):
    """For the iterations each scale ran, the KV-cached logits equal the full-sequence reference above on the sampled
    tokens; where some scale runs more iterations than an earlier one, the other setting's reference differs."""
    _, var = tiny_vae_var(True)
    var.cond_drop_rate = 0.0
    labels = torch.tensor([1, 2])
    _, logits, tokens, stats = sample_and_capture(var, 2, labels, g_seed=3, cfg=1.5, top_k=10, schedule=schedule,
                                                  fill_forward=fill_forward)
    counts = stats.iters
    increasing = any(b > a for a, b in zip(counts, counts[1:]))
    if schedule.adaptive:
        assert increasing, f'tau 0.3 should stop some scale before a later one ({counts}): pick another tau'
    else:
        assert counts == schedule.counts
    cached = torch.cat(logits, dim=1)
    cond, null = reference_logits(var, counts, fill_forward, labels, tokens)
    assert max_diff(cached[:2], cond) < 1e-4 and max_diff(cached[2:], null) < 1e-4, \
        f'cached vs reference: {max_diff(cached[:2], cond):.2e}, {max_diff(cached[2:], null):.2e}'
    other, _ = reference_logits(var, counts, not fill_forward, labels, tokens)
    assert (max_diff(cond, other) > 1e-3) == increasing


def test_fill_forward_only_matters_for_increasing_schedules():
    """Non-increasing counts never reach an iteration index an earlier scale skipped: both settings sample alike."""
    _, var = tiny_vae_var(True)
    kw = dict(B=2, label_B=torch.tensor([1, 2]), g_seed=3, top_k=1)
    for sch in (S.decreasing(4, 2, 4), S.explicit([3, 3, 2, 0], 4)):
        assert torch.equal(var.autoregressive_infer_cfg(schedule=sch, fill_forward=True, **kw),
                           var.autoregressive_infer_cfg(schedule=sch, fill_forward=False, **kw))


def test_editing_keeps_tokens_outside_the_mask():
    vae, var = tiny_vae_var(True)
    g = torch.Generator().manual_seed(0)
    gt = [torch.randint(0, var.V, (2, pn * pn), generator=g) for pn in var.patch_nums]
    keep = [torch.rand(2, pn * pn, generator=g) < 0.5 for pn in var.patch_nums]
    _, _, tokens, _ = sample_and_capture(var, 2, torch.tensor([0, 1]), g_seed=1, edit=EditSpec(gt, keep))
    for t, gt_k, keep_k in zip(tokens, gt, keep):
        assert torch.equal(t[keep_k], gt_k[keep_k])
    assert any(not torch.equal(t[~k], gt_k[~k]) for t, gt_k, k in zip(tokens, gt, keep))


@pytest.mark.parametrize('use_implicit', [False, True])
def test_per_row_seeds_make_batching_invisible(use_implicit):
    """Same tokens whatever the batch; images equal up to float noise of batch-size-dependent kernels."""
    _, var = tiny_vae_var(use_implicit)
    kw = dict(cfg=1.5, top_k=10, top_p=0.9, schedule=S.decreasing(3, 2, 4))
    img_b, _, tok_b, _ = sample_and_capture(var, 3, torch.tensor([1, 2, 3]), g_seed=[11, 12, 13], **kw)
    for b, (label, seed) in enumerate([(1, 11), (2, 12), (3, 13)]):
        img_1, _, tok_1, _ = sample_and_capture(var, 1, torch.tensor([label]), g_seed=seed, **kw)
        assert all(torch.equal(tb[b:b + 1], t1) for tb, t1 in zip(tok_b, tok_1))
        assert torch.allclose(img_b[b:b + 1], img_1, atol=1e-5)
        assert torch.equal(var.autoregressive_infer_cfg(1, torch.tensor([label]), g_seed=[seed], **kw), img_1)
    smooth = dict(kw, more_smooth=True)
    a = var.autoregressive_infer_cfg(2, None, g_seed=[5, 6], **smooth)
    assert torch.allclose(a[1:], var.autoregressive_infer_cfg(1, None, g_seed=6, **smooth), atol=1e-5)
    with pytest.raises(ValueError, match='one seed per row'):
        var.autoregressive_infer_cfg(2, 1, g_seed=[1, 2, 3])


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


@pytest.mark.parametrize('extra', [1, -1])
def test_a_schedule_of_the_wrong_length_is_one_clear_error(extra):
    """A schedule built for another number of scales (e.g. from Python) is refused before sampling, naming both."""
    _, var = tiny_vae_var(True)
    K = len(var.patch_nums)
    with pytest.raises(ValueError, match=f'lists {K + extra} iteration counts for a model of {K} scales'):
        var.autoregressive_infer_cfg(2, 0, g_seed=0, schedule=S.constant(2, K + extra))
