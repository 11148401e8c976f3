"""Training-forward invariants of VAR and VIAR: block-causal mask, S-JFB gradients and memory."""
import pytest
import torch

from models.layout import block_causal_bias, level_ids, scale_begin_ends
from tests.tiny import tiny_tokens, tiny_vae_var


def test_layout_pure_functions():
    pn = (1, 2, 3)
    assert scale_begin_ends(pn) == [(0, 1), (1, 5), (5, 14)]
    assert level_ids(pn).tolist() == [0] + [1] * 4 + [2] * 9
    bias = block_causal_bias(pn)[0, 0]
    assert bias[0, 1] == -torch.inf and bias[4, 1] == 0 and bias[4, 5] == -torch.inf and bias[13, 0] == 0


@pytest.mark.parametrize('use_implicit', [False, True])
def test_changing_scale_k_changes_no_earlier_logits(use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    var.cond_drop_rate = 0.0
    label = torch.tensor([1, 3])
    idx, x = tiny_tokens(vae, var, 2)
    for k in range(1, len(var.patch_nums)):
        b, e = var.begin_ends[k]
        x2 = x.clone()
        x2[:, b - var.first_l:e - var.first_l] += torch.randn_like(x2[:, b - var.first_l:e - var.first_l])
        with torch.no_grad():
            y1 = var(label, x, jfb_iters=(2, 1))
            y2 = var(label, x2, jfb_iters=(2, 1))
        assert torch.equal(y1[:, :b], y2[:, :b]), f'scale {k} leaked into earlier scales'
        assert not torch.allclose(y1[:, b:e], y2[:, b:e]), f'scale {k} input had no effect on its own logits'


def test_sjfb_gradients_reach_every_part():
    vae, var = tiny_vae_var(True)
    var.train()
    idx, x = tiny_tokens(vae, var, 2)
    logits = var(torch.tensor([0, 1]), x, jfb_iters=(3, 2))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat(idx, 1).flatten()).backward()
    for prefix in ('pre_blocks.0.', 'implicit_block.', 'implicit_block_projection.', 'post_blocks.0.', 'word_embed.'):
        grads = [p.grad for n, p in var.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix


def test_jfb_none_draws_within_ranges():
    _, var = tiny_vae_var(True)   # jfb_no_grad (0, 10), jfb_with_grad (1, 12)
    draws = {var.draw_jfb_iters(s, seed=3) for s in range(300)}
    assert all(0 <= n <= 10 and 1 <= m <= 12 for n, m in draws)
    assert {n for n, _ in draws} == set(range(11)) and {m for _, m in draws} == set(range(1, 13))
    assert var.draw_jfb_iters(7, seed=3) == var.draw_jfb_iters(7, seed=3)   # rank-identical for a step
    _, fixed = tiny_vae_var(True, jfb_no_grad=(2, 2), jfb_with_grad=(5, 5))
    assert fixed.draw_jfb_iters() == (2, 5)   # step None: Python's global random, bounds inclusive


def test_grad_ckpt_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        vae, var = tiny_vae_var(True)
        var.train()
        var.grad_ckpt = ckpt
        idx, x = tiny_tokens(vae, var, 2)
        torch.manual_seed(5)
        var(torch.tensor([0, 1]), x, jfb_iters=(1, 2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in var.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_build_is_deterministic_and_official_init():
    _, a = tiny_vae_var(True, seed=4)
    _, b = tiny_vae_var(True, seed=4)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    from models import build_vae_var
    _, v = build_vae_var('cpu', patch_nums=(1, 2, 3, 4), V=48, Cvae=8, ch=32, num_classes=5, depth=4, embed_dim=32,
                         num_heads=2, vae_ch_mult=(1, 1), vae_num_res_blocks=1, use_implicit=True, pre_depth=1, post_depth=1)
    C = v.C
    std = (1 / C / 3) ** 0.5   # init_std=-1: automatic
    assert torch.all(v.head.bias == 0) and abs(v.head.weight.std().item() / (0.02 * std) - 1) < 0.3
    gate = v.implicit_block.ada_lin[1].weight
    assert abs(gate[:2 * C].std().item() / (1e-5 * std) - 1) < 0.3    # gamma channels near zero
    assert abs(gate[2 * C:].std().item() / (0.5 * std) - 1) < 0.3
    proj = v.pre_blocks[0].attn.proj.weight
    assert abs(proj.std().item() / (std / (2 * v.depth) ** 0.5) - 1) < 0.3
    assert torch.allclose(v.pre_blocks[0].attn.scale_mul_1H11.exp(), torch.tensor(4.0))
    # block-causal mask of pyramid 1_2_3_4, built from its token ranges: a row of scale s sees columns < end of s
    mask = torch.full((30, 30), -torch.inf)
    for begin, end in ((0, 1), (1, 5), (5, 14), (14, 30)):
        mask[begin:end, :end] = 0.0
    assert v.attn_bias_for_masking.shape == (1, 1, 30, 30)
    assert torch.equal(v.attn_bias_for_masking[0, 0], mask)


@pytest.mark.parametrize('use_implicit', [False, True])
def test_bf16_autocast_training_and_sampling(use_implicit):
    from models import schedules as S
    from utils.sample.compile_util import prepare_for_sampling
    vae, var = tiny_vae_var(use_implicit)
    var.cond_drop_rate = 0.0
    _, x = tiny_tokens(vae, var, 2)
    ref = var(torch.tensor([0, 1]), x, jfb_iters=(1, 1))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = var(torch.tensor([0, 1]), x, jfb_iters=(1, 1))
    kw = dict(g_seed=0, schedule=S.constant(2, 4), return_stats=True)
    img, st16 = prepare_for_sampling(var, dtype='bf16')(2, 1, **kw)   # the sampling scripts' autocast path
    _, st32 = var.autoregressive_infer_cfg(2, 1, **kw)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.isfinite(img).all() and img.shape == (2, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    assert st16.kv_cache_bytes * 2 == st32.kv_cache_bytes   # caches take the autocast dtype
