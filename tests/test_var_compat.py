"""Code written against VAR's module internals runs on this project's models and gives the official numbers.

The sampling loop below uses only VAR's names (`b.attn.kv_caching`, `b(x=, cond_BD=, attn_bias=)`, `var.rng`,
`sample_with_top_k_top_p_`, ...), the way VAR's zero-shot editing notebook writes it; on the official fixture's
weights it must draw the tokens the official code drew. The rest pins each name against the project's own call.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import models.helpers as official_helpers   # VAR's module of the two samplers (most VAR code imports them there)
from models import sample_ops
from models.kv_cache import KVCache
from models.schedules import explicit, official_iters
from models.var import AdaLNSelfAttn, gumbel_softmax_with_rng, sample_with_top_k_top_p_
from tests.test_official_fixture import FIXTURES, our_models
from tests.tiny import tiny_vae_var

META = FIXTURES['tiny']['meta']


def all_blocks(var):
    """Every block whose attention caches, in VAR's attribute names."""
    if var.use_implicit:
        return [*var.pre_blocks, var.implicit_block, *var.post_blocks]
    return list(var.blocks)


def backbone_the_official_way(var, x, cond_BD_or_gss, iters: int):
    """One scale through the blocks with VAR's call; VIAR iterates its implicit block `iters` times, iteration `it`
    attending through its own cache (`cur_it`), as the official VIAR sampler does."""
    if not var.use_implicit:
        for b in var.blocks:
            x = b(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)
        return x
    for b in var.pre_blocks:
        x = b(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)
    injection = x
    for it in range(iters):
        z = var.implicit_block_projection(torch.cat((x, injection), dim=-1))
        x = var.implicit_block(z, cond_BD_or_gss, None, cur_it=it)
    for b in var.post_blocks:
        x = b(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)
    return x


@torch.no_grad()
def sample_the_official_way(var, label_B, g_seed, cfg, top_k, top_p, iters=None):
    """VAR's CFG sampling loop over VAR's internals only: (every scale's idx_Bl, the image in [0, 1])."""
    B = label_B.shape[0]
    var.rng.manual_seed(g_seed)
    rng = var.rng
    for b in all_blocks(var):
        b.attn.kv_caching(True)
    # conditional rows first, then as many rows of the null class for guidance
    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, fill_value=var.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    next_token_map = (sos.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
                      + lvl_pos[:, :var.first_l])
    quant, SN = var.vae_quant_proxy[0], len(var.patch_nums)
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    tokens, end = [], 0
    for si, pn in enumerate(var.patch_nums):
        end += pn * pn
        x = backbone_the_official_way(var, next_token_map, var.shared_ada_lin(cond_BD), iters[si] if iters else 0)
        logits_BlV = var.get_logits(x, cond_BD)
        t = cfg * si / var.num_stages_minus_1
        logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=1)[:, :, 0]
        tokens.append(idx_Bl)
        h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_token_map = quant.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
        if si != var.num_stages_minus_1:   # the next scale's input, the same for both halves of the batch
            words = var.word_embed(next_token_map.view(B, var.Cvae, -1).transpose(1, 2))
            next_token_map = (words + lvl_pos[:, end:end + var.patch_nums[si + 1] ** 2]).repeat(2, 1, 1)
    for b in all_blocks(var):
        b.attn.kv_caching(False)
    return tokens, var.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)


CASES = [pytest.param('var', s, None, id=f'var-{s}') for s in META['samplers']]
CASES += [pytest.param('viar', s, tuple(k), id=f'viar-{s}-{k[0]}_{k[1]}') for s in META['samplers'] for k in META['knobs']]


@pytest.mark.parametrize('kind,sampler,knob', CASES)
def test_the_official_loop_draws_the_official_tokens(kind, sampler, knob):
    """float64, whose every decision the fixture test asserts is far from a tie: tokens equal on any CPU. VIAR's
    knobs include an increasing one, where the official per-iteration caches differ from the project's default."""
    vae, var = our_models('tiny', kind, torch.float64)
    want = FIXTURES['tiny'][kind]['fp64']['samples'][(sampler, *(knob or (3, 3)))]
    iters = official_iters(*knob, len(var.patch_nums)) if knob else None
    got, img = sample_the_official_way(var, torch.tensor(META['labels_sample']), META['g_seed'], META['cfg'],
                                       iters=iters, **META['samplers'][sampler])
    assert len(got) == len(want)
    for si, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f'scale {si}: {(a != b).sum().item()} of {a.numel()} tokens differ'
    # the project's own sampler, official KV rule, draws the same image
    ours = var.autoregressive_infer_cfg(len(got[0]), torch.tensor(META['labels_sample']), g_seed=META['g_seed'],
                                        cfg=META['cfg'], fill_forward=False, **META['samplers'][sampler],
                                        schedule=explicit(iters, len(iters)) if iters else None)
    torch.testing.assert_close(img, ours, rtol=0, atol=1e-12)


def test_the_official_loop_with_shared_adaln_equals_the_project_sampler():
    """A shared-AdaLN VAR (`cond_BD_or_gss = var.shared_ada_lin(cond_BD)`), float64, top-k/top-p."""
    vae, var = tiny_vae_var(False, shared_aln=True)
    vae, var = vae.double(), var.double()
    label_B = torch.tensor([2, 0, 4])
    got, img = sample_the_official_way(var, label_B, 7, 2.0, top_k=12, top_p=0.9)
    toks = []
    hook = var.vae_quant_proxy[0].embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
    try:
        ours = var.autoregressive_infer_cfg(3, label_B, g_seed=7, cfg=2.0, top_k=12, top_p=0.9)
    finally:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(got, toks))
    torch.testing.assert_close(img, ours, rtol=0, atol=1e-12)


def test_kv_caching_starts_empty_appends_every_call_and_clears():
    vae, var = tiny_vae_var(False)
    b = var.blocks[1]
    cond_BD = torch.randn(2, var.D)
    assert not b.attn.caching and b.attn.cached_k is None
    b.attn.kv_caching(True)
    assert b.attn.caching and b.attn.cached_k is None and b.attn.cached_v is None
    with torch.no_grad():
        for l in (1, 4, 9):
            b(x=torch.randn(2, l, var.C), cond_BD=cond_BD, attn_bias=None)
    H, c = var.num_heads, var.C // var.num_heads
    assert b.attn.cached_k.shape == b.attn.cached_v.shape == (2, H, 14, c)
    b.attn.kv_caching(False)
    assert not b.attn.caching and b.attn.cached_k is None and b.attn.cached_v is None


def test_the_implicit_block_caches_each_iteration_apart():
    vae, var = tiny_vae_var(True)
    attn = var.implicit_block.attn
    cond_BD = torch.randn(2, var.D)
    attn.kv_caching(True)
    with torch.no_grad():
        for l, iters in ((1, 3), (4, 2)):
            for it in range(iters):
                var.implicit_block(torch.randn(2, l, var.C), cond_BD, None, cur_it=it)
    assert {t: k.shape[2] for t, k in attn.cached_k.items()} == {0: 5, 1: 5, 2: 1}
    attn.kv_caching(False)
    assert attn.cached_k is None


@pytest.mark.parametrize('shared_aln', [False, True])
def test_the_official_call_equals_the_project_call(shared_aln):
    """Without caching, over the whole sequence under the training mask; with caching, scale by scale against the
    project's KVCache. A shared-AdaLN block takes `shared_ada_lin(cond_BD)`, one with its own ada_lin the raw
    condition: both end at the block's `modulation`."""
    vae, var = tiny_vae_var(False, shared_aln=shared_aln)
    b = var.blocks[2]
    cond_BD = torch.randn(2, var.D)
    cond_BD_or_gss = var.shared_ada_lin(cond_BD)
    ada = b.modulation(cond_BD_or_gss)
    x_BLC = torch.randn(2, var.L, var.C)
    with torch.no_grad():
        official = b(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=var.attn_bias_for_masking)
        assert torch.equal(official, b(x_BLC, ada, var.attn_bias_for_masking))
        kv = KVCache(var.L)
        b.attn.kv_caching(True)
        for bg, ed in var.begin_ends:
            x_BlC = x_BLC[:, bg:ed]
            torch.testing.assert_close(b(x=x_BlC, cond_BD=cond_BD_or_gss, attn_bias=None), b(x_BlC, ada, None, kv),
                                       rtol=1e-6, atol=1e-6)
        b.attn.kv_caching(False)


def test_a_block_with_its_own_adaln_takes_the_raw_condition():
    vae, var = tiny_vae_var(False)
    b = var.blocks[0]
    assert isinstance(b, AdaLNSelfAttn) and not b.shared_aln and isinstance(var.shared_ada_lin, torch.nn.Identity)
    cond_BD, x_BLC = torch.randn(3, var.D), torch.randn(3, 5, var.C)
    with torch.no_grad():
        want = b(x_BLC, b.ada_lin(cond_BD).view(-1, 1, 6, var.C), None)
        assert torch.equal(b(x=x_BLC, cond_BD=cond_BD, attn_bias=None), want)


def test_the_project_sampler_leaves_the_official_caches_alone():
    vae, var = tiny_vae_var(False)
    for b in var.blocks:
        b.attn.kv_caching(True)
    var.autoregressive_infer_cfg(2, 1, g_seed=0)
    assert all(b.attn.caching and b.attn.cached_k is None for b in var.blocks)


def test_rng_and_uniform_prob_are_vars():
    vae, var = tiny_vae_var(False)
    assert isinstance(var.rng, torch.Generator) and var.rng is var.rng and var.rng.device == var.lvl_1L.device
    p = var.uniform_prob
    assert p.shape == (1, var.num_classes) and p.dtype == torch.float32 and torch.allclose(p.sum(), torch.tensor(1.0))
    var.rng.manual_seed(3)
    label_B = torch.multinomial(var.uniform_prob, num_samples=6, replacement=True, generator=var.rng).reshape(6)
    assert torch.equal(label_B, sample_ops.random_labels(6, var.num_classes, torch.Generator().manual_seed(3), 'cpu'))


def test_sample_with_top_k_top_p_is_vars_sampler():
    logits_BlV = torch.randn(3, 5, 40)
    for top_k, top_p in ((0, 0.0), (1, 0.0), (7, 0.0), (0, 0.8), (9, 0.7)):
        got_logits = logits_BlV.clone()
        got = sample_with_top_k_top_p_(got_logits, top_k, top_p, rng=torch.Generator().manual_seed(1))
        want_logits = logits_BlV.clone()
        want = sample_ops.sample_top_k_top_p_(want_logits, top_k, top_p, rng=torch.Generator().manual_seed(1))
        assert got.shape == (3, 5, 1) and torch.equal(got[:, :, 0], want)
        assert torch.equal(got_logits, want_logits)   # filtered in place, as VAR's
    # several samples per position, with replacement (n > 0) or without (n < 0): VAR's one multinomial call
    for n in (4, -4):
        got = sample_with_top_k_top_p_(logits_BlV.clone(), 10, 0.0, rng=torch.Generator().manual_seed(2), num_samples=n)
        probs_NV = sample_ops.filter_top_k_top_p_(logits_BlV.clone(), 10).softmax(-1).view(-1, 40)
        want = torch.multinomial(probs_NV, 4, replacement=n > 0, generator=torch.Generator().manual_seed(2))
        assert got.shape == (3, 5, 4) and torch.equal(got, want.view(3, 5, 4))
    assert len(set(got.view(-1, 4)[0].tolist())) == 4


def test_gumbel_softmax_with_rng_is_vars():
    logits = torch.randn(2, 3, 11)
    soft = gumbel_softmax_with_rng(logits, tau=0.5, rng=torch.Generator().manual_seed(4))
    assert torch.equal(soft, sample_ops.gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(4)))
    # another dim: the noise is drawn in logits' own order, the softmax taken over dim
    g = -torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(5)).log()
    got = gumbel_softmax_with_rng(logits, tau=2.0, dim=1, rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, ((logits + g) / 2.0).softmax(1), rtol=0, atol=0)
    # hard: one-hot values, the soft sample's gradient
    x = logits.clone().requires_grad_()
    hard = gumbel_softmax_with_rng(x, tau=0.5, hard=True, rng=torch.Generator().manual_seed(4))
    assert torch.equal(hard.detach(), F.one_hot(soft.argmax(-1), 11).to(hard.dtype))
    hard[..., 0].sum().backward()
    y = logits.clone().requires_grad_()
    sample_ops.gumbel_softmax(y, 0.5, torch.Generator().manual_seed(4))[..., 0].sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    # no generator: F.gumbel_softmax on the global one
    torch.manual_seed(6)
    want = F.gumbel_softmax(logits, tau=0.5, hard=True)
    torch.manual_seed(6)
    assert torch.equal(gumbel_softmax_with_rng(logits, tau=0.5, hard=True), want)


def test_the_internals_var_code_reads_exist():
    vae, var = tiny_vae_var(False)
    for name in ('blocks', 'shared_ada_lin', 'get_logits', 'word_embed', 'lvl_1L', 'pos_1LC', 'pos_start', 'first_l',
                 'num_stages_minus_1', 'Cvae', 'class_emb', 'lvl_embed', 'patch_nums', 'num_classes', 'rng',
                 'uniform_prob'):
        assert hasattr(var, name), name
    assert hasattr(var.vae_proxy[0], 'fhat_to_img') and hasattr(vae, 'img_to_idxBl')
    quant = var.vae_quant_proxy[0]
    assert hasattr(quant, 'embedding') and hasattr(quant, 'get_next_autoregressive_input')
    assert all(hasattr(b.attn, 'kv_caching') for b in var.blocks)
    assert official_helpers.sample_with_top_k_top_p_ is sample_with_top_k_top_p_
    assert official_helpers.gumbel_softmax_with_rng is gumbel_softmax_with_rng
    assert isinstance(var.blocks[0].drop_path, official_helpers.DropPath)


def test_utils_data_has_vars_loader_and_normalisation(tmp_path):
    from PIL import Image
    from utils.data import normalize_01_into_pm1, pil_loader
    path = os.path.join(tmp_path, 'a.png')
    Image.new('L', (3, 2), 128).save(path)
    img = pil_loader(path)
    assert img.mode == 'RGB' and img.size == (3, 2)
    x = torch.rand(4, 5)
    assert torch.equal(normalize_01_into_pm1(x), x.add(x).add_(-1))


@pytest.mark.slow
def test_a_compiled_block_takes_both_calls():
    """The scale-loop modules are compiled one by one (utils/sample/compile_util.py): the official call reaches the
    compiled forward, its caching breaks the graph like the project's KVCache does."""
    vae, var = tiny_vae_var(False)
    b = var.blocks[1]
    cond_BD, x_BLC = torch.randn(2, var.D), torch.randn(2, 4, var.C)
    with torch.no_grad():
        want = b(x_BLC, b.modulation(cond_BD), None)
        b.compile(backend='eager', dynamic=True)
        assert torch.equal(b(x_BLC, b.modulation(cond_BD), None), want)
        assert torch.equal(b(x=x_BLC, cond_BD=cond_BD, attn_bias=None), want)
        b.attn.kv_caching(True)
        for _ in range(2):
            b(x=x_BLC, cond_BD=cond_BD, attn_bias=None)
        assert b.attn.cached_k.shape[2] == 8
