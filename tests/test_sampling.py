"""KV-cached next-scale sampling: equals teacher forcing, schedules, determinism, CFG, editing."""
import pytest
import torch

from models import EditSpec
from models import schedules as S
from models.kv_cache import implicit_cache_capacities
from models.sample_ops import filter_top_k_top_p_
from models.solver import fixed_point_iterate
from tests.tiny import tiny_vae_var
from utils.sample import schedule_flags as flags


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


def test_official_rounding_of_decreasing_schedule():
    assert S.decreasing(10, 5, 10).counts == [10, 9, 8, 8, 7, 7, 6, 6, 5, 5]
    assert S.decreasing(20, 5, 10).counts == [20, 18, 16, 15, 13, 11, 10, 8, 6, 5]
    assert S.constant(10, 10).counts == [10] * 10
    assert flags.from_cli(10, iters='20,18,16,14,12,10,8,6,5,5').counts == [20, 18, 16, 14, 12, 10, 8, 6, 5, 5]
    sch = flags.from_cli(4, tau='0.1', cap=6)
    assert sch.adaptive and sch.tau == [0.1] * 4 and sch.counts == [6] * 4
    with pytest.raises(ValueError, match='one per scale'):
        flags.from_cli(10, iters='3,3')


def test_official_rule_takes_the_first_k_of_ten_points():
    assert S.official_iters(20, 5, 10) == [20, 18, 16, 15, 13, 11, 10, 8, 6, 5]
    assert S.official_iters(20, 5, 4) == [20, 18, 16, 15]    # truncated, not re-spaced
    assert S.official_iters(7, 7, 3) == [7, 7, 7]
    assert S.official_iters(10, 5, 10) == S.linspace_iters(10, 5, 10)   # the two rules agree on 10 scales
    with pytest.raises(ValueError):
        S.official_iters(10, 10, 11)


def test_schedule_names_say_which_rule_and_what_runs():
    k, o = S.decreasing(8, 2, 4), S.decreasing(8, 2, 4, official=True)
    assert k.counts == [8, 6, 4, 2] and o.counts == [8, 7, 6, 6]
    assert k.label() == 'Dec.(8,2)' and o.label() == 'Dec.(8,2)/10'   # two rules, two names
    assert k.describe() == 'Dec.(8,2): 8,6,4,2 iterations per scale'
    assert o.describe() == 'Dec.(8,2)/10: 8,7,6,6 iterations per scale'
    assert S.decreasing(8, 2, 10, official=True).label() == 'Dec.(8,2)'    # no suffix where the rules agree
    assert flags.from_token('8:2/10', 4).counts == o.counts and flags.from_token('8:2', 4).counts == k.counts
    ada = S.adaptive([0.1, 0.05, 0.02, 0.01], 20, 4)
    assert ada.label() == 'Ada.(tau=0.1,0.05,0.02,0.01;cap=20)'       # every tau, not only the last
    assert S.adaptive(0.01, 20, 4).label() == 'Ada.(tau=0.01;cap=20)'
    inc = S.decreasing(0, 4, 4)
    assert inc.label() == 'Inc.(0,4)' and 'scale 1 skips the implicit block' in inc.describe()
    assert 'scales 1,2 skip' in S.explicit([0, 0, 1, 2], 4).describe()


def test_adaptive_stops_where_residual_crosses_tau_and_never_beyond_cap():
    G = lambda z, t: 0.5 * z + 1.0   # residual after t+1 iterations: 0.5**t
    for tau, want in [(0.3, 3), (0.26, 3), (0.126, 4), (0.124, 5), (1.0, 1), (1e-9, 8)]:
        z, st = fixed_point_iterate(G, torch.zeros(1), max_iter=8, tau=tau, stop_mode='abs')
        assert st.iters == want, tau
        assert st.iters == 8 or float(st.residual) <= tau
    _, st = fixed_point_iterate(G, torch.zeros(1), max_iter=8, tau=1.0, stop_mode='abs', min_iter=3)
    assert st.iters == 3


def test_adaptive_schedule_on_the_model_reports_iterations():
    _, var = tiny_vae_var(True)
    _, st_loose = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(1e9, 5, 4), return_stats=True)
    _, st_tight = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(0.0, 5, 4), return_stats=True)
    assert st_loose.iters == [1] * 4 and st_tight.iters == [5] * 4
    assert all(r is not None and r >= 0 for r in st_tight.residuals)
    taus = [st_tight.residuals[0] * 1.01] * 4
    _, st = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.adaptive(taus, 5, 4), return_stats=True)
    assert st.iters[0] <= 5 and all(1 <= i <= 5 for i in st.iters)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    for p, keep in [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.95, 4)]:
        out = filter_top_k_top_p_(probs.log().view(1, 1, 4).clone(), top_p=p)
        assert torch.isfinite(out).sum().item() == keep, p
    out = filter_top_k_top_p_(probs.log().view(1, 1, 4).clone(), top_k=2)
    assert torch.isfinite(out).view(-1).tolist() == [True, True, False, False]


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


def test_cache_capacities_and_bytes_follow_the_schedule():
    pn = (1, 2, 3, 4)
    assert implicit_cache_capacities(pn, [3, 2, 1, 1], True) == [30, 5, 1]
    assert implicit_cache_capacities(pn, [1, 3, 2, 3], False) == [30, 29, 20]
    assert implicit_cache_capacities(pn, [1, 3, 2, 3], True) == [30, 30, 30]
    _, var = tiny_vae_var(True)
    sizes = [var.autoregressive_infer_cfg(1, 0, schedule=s, return_stats=True)[1].kv_cache_bytes
             for s in (S.constant(1, 4), S.decreasing(3, 1, 4), S.constant(3, 4))]
    assert sizes[0] < sizes[1] < sizes[2]


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
