"""Same numbers as the official code, on outputs it computed: tests/data/official_tiny*.pt.

tests/make_official_fixture.py ran the official mobiushy/VIAR code (commit in each file's meta) on tiny random
weights (VAR and VIAR, depth 4, width 16, 2 heads, pre/post 1/1, V 48, Cvae 8, 5 classes, every weight
~ N(0, 0.3^2)) and stored the state dicts, the teacher-forced logits and every scale's sampled token map, in
float32 and in float64. Two configurations: `tiny` (pyramid 1..4) and `saln512` (shared AdaLN, VAR-d36-s's
`--saln=1`, on the 512 px pyramid 1,2,3,4,6,9,13,18,24,32, L = 2240; its (1, 1, L, L) mask is stored as a sha256).
Here the state dicts load strictly into this project's models, which must reproduce those outputs.

On every CPU: float64 logits within a rounding bound derived from the computation (tests/rounding.py; about 1e-11,
where float32 kernels of two CPUs differ by 1e-5), float32 logits within the float32 bound of the official float64
ones, and tokens exactly equal. A sampled token can only be claimed equal on another CPU where the decision that
drew it has a margin wider than the logits' rounding error: in float64 every decision must have it (asserted, so
equality cannot depend on the CPU); in float32 every decision with that margin must agree, and the comparison stops
at the first scale where a decision inside the rounding error went the other way (on the CPU that wrote the file
nothing differs and every scale is compared).
"""
import hashlib
import os

import pytest
import torch

from models import build_var
from models import schedules as S
from models.layout import PYRAMIDS
from models.schedules import official_iters
from models.vqvae import VQVAE
from tests.rounding import decisions, reduction_stages, replay_draws, rounding_bound, unit_roundoff
from utils.checkpoint import load_var_weights

DATA = os.path.join(os.path.dirname(__file__), 'data')
FIXTURES = {name: torch.load(os.path.join(DATA, f), weights_only=True)
            for name, f in (('tiny', 'official_tiny.pt'), ('saln512', 'official_tiny_saln512.pt'))}
KINDS = {'var': False, 'viar': True}
DTYPES = {'fp64': torch.float64, 'fp32': torch.float32}
TF_JFB = (2, 1)   # the fixture's teacher-forced VIAR: n = 2 iterations without grad, m = 1 with


def mask_sha256(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.float().contiguous().numpy().tobytes()).hexdigest()


def our_models(fixture: str, kind: str, dtype: torch.dtype):
    """This project's models with the fixture's weights (strict load of every transformer key), in dtype."""
    meta, fx = FIXTURES[fixture]['meta'], FIXTURES[fixture][kind]
    s = meta['sizes']
    # only the quantizer matters for tokens; a 2x decoder keeps the final decode cheap
    vae = VQVAE(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=tuple(s['patch_nums']), ch_mult=(1, 1), num_res_blocks=1)
    vae.quantize.load_state_dict(fx['quant_sd'], strict=True)
    var = build_var(vae, depth=s['depth'], use_implicit=KINDS[kind], pre_depth=s['pre_depth'],
                    post_depth=s['post_depth'], embed_dim=s['embed_dim'], num_heads=s['num_heads'],
                    num_classes=s['num_classes'], attn_l2_norm=True, patch_nums=tuple(s['patch_nums']),
                    drop_path_rate=0.0, shared_aln=meta.get('shared_aln', False))
    sd = dict(fx['var_sd'])
    if 'mask_sha256' in fx:   # the mask is checked by its digest
        mask = var.state_dict()['attn_bias_for_masking']
        assert tuple(mask.shape) == tuple(fx['mask_shape']) and mask_sha256(mask) == fx['mask_sha256']
        sd['attn_bias_for_masking'] = mask
    load_var_weights(var, sd)
    var.cond_drop_rate = 0.0
    return vae.eval().to(dtype), var.eval().to(dtype)


def official(fixture: str, kind: str, dtype: torch.dtype) -> dict:
    """The official outputs computed in dtype."""
    fx = FIXTURES[fixture][kind]
    return fx['fp64'] if dtype == torch.float64 else fx


def longest_sum(var) -> int:
    """The longest reduction of a forward: attention over all tokens, fc2 over 4C, the softmax over V."""
    return max(var.L, 4 * var.C, var.V)


def test_saln512_fixture_is_the_shared_adaln_512_configuration():
    fixture = FIXTURES['saln512']
    assert fixture['meta']['shared_aln'] is True and tuple(fixture['meta']['sizes']['patch_nums']) == PYRAMIDS[512]
    for kind in KINDS:
        sd = fixture[kind]['var_sd']
        assert 'shared_ada_lin.1.weight' in sd and sd['pos_1LC'].shape[1] == 2240
        blocks = ('blocks.', 'pre_blocks.', 'post_blocks.', 'implicit_block.')
        assert not any('ada_lin' in k for k in sd if k.startswith(blocks))


def test_fixtures_hold_float32_and_float64_outputs_of_the_same_weights():
    for fixture in FIXTURES.values():
        for kind in KINDS:
            fx = fixture[kind]
            assert fx['logits_BLV'].dtype == torch.float32 and fx['fp64']['logits_BLV'].dtype == torch.float64
            assert set(fx['samples']) == set(fx['fp64']['samples'])
            # the same function: float32 within its rounding of float64, and not identical (two real runs)
            diff = (fx['logits_BLV'].double() - fx['fp64']['logits_BLV']).abs().max().item()
            assert 0 < diff < 1e-3


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('fixture', FIXTURES)
def test_teacher_forced_logits_equal_the_official(fixture, kind, dtype):
    """Ours in dtype against the official float64 outputs, within dtype's rounding bound of the computation."""
    dt = DTYPES[dtype]
    vae, var = our_models(fixture, kind, dt)
    fx, meta = FIXTURES[fixture][kind], FIXTURES[fixture]['meta']
    want_x, want_logits = fx['fp64']['x_BLCv'], fx['fp64']['logits_BLV']
    with torch.no_grad():
        x_BLCv = vae.quantize.idxBl_to_var_input(fx['idx_Bl'])
        logits_BLV = var(torch.tensor(meta['labels_train']), x_BLCv, jfb_iters=TF_JFB if KINDS[kind] else None)
    assert x_BLCv.dtype == logits_BLV.dtype == dt
    assert logits_BLV.std() > 0.1   # not a degenerate model
    # the teacher-forcing input: per scale a bicubic upsampling, a 3x3 conv and an area pooling of the whole map
    SN, HW = len(var.patch_nums), var.patch_nums[-1] ** 2
    tol_x = rounding_bound(dt, 3 * SN, HW, want_x.abs().max().item())
    torch.testing.assert_close(x_BLCv.double(), want_x, atol=tol_x, rtol=0)
    calls = len(var.backbone_blocks()) - 1 + sum(TF_JFB) if KINDS[kind] else var.depth
    tol = rounding_bound(dt, reduction_stages(calls, sum(TF_JFB) if KINDS[kind] else 0), longest_sum(var),
                         want_logits.abs().max().item())
    torch.testing.assert_close(logits_BLV.double(), want_logits, atol=tol, rtol=0)


def sample_with_margins(vae, var, meta: dict, sampler: str, knob: tuple, fill_forward: bool = False):
    """Our sampled token maps, and each decision's margin against the rounding error of the logits it came from:
    (tokens, the tokens the decisions derived from our logits and the replayed draws lead to, margins (B, l),
    error bounds), one entry per scale."""
    K, B, cfg = len(var.patch_nums), len(meta['labels_sample']), meta['cfg']
    counts = official_iters(*knob, K)
    toks, logits = [], []
    hooks = [vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone())),
             var.head.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))]
    try:
        with torch.no_grad():
            var.autoregressive_infer_cfg(B, torch.tensor(meta['labels_sample']), g_seed=meta['g_seed'], cfg=cfg,
                                         schedule=S.explicit(counts, K), fill_forward=fill_forward,
                                         **meta['samplers'][sampler])
    finally:
        for h in hooks:
            h.remove()
    dt = logits[0].dtype
    draws = replay_draws(meta['g_seed'], [(B * pn * pn, var.V) for pn in var.patch_nums], dt)
    top_k, top_p = meta['samplers'][sampler]['top_k'], meta['samplers'][sampler]['top_p']
    calls = len(var.backbone_blocks()) - 1 + max(counts) if var.use_implicit else var.depth
    stages = reduction_stages(calls, max(counts) if var.use_implicit else 0)
    choices, margins, errors = [], [], []
    for si, (out_RlV, idx_Bl, q_NV) in enumerate(zip(logits, toks, draws)):
        t = cfg * si / (K - 1)
        guided_BlV = (1 + t) * out_RlV[:B] - t * out_RlV[B:]
        choice_Bl, margin_Bl = decisions(guided_BlV, top_k, top_p, q_NV.view(guided_BlV.shape))
        choices.append(choice_Bl)
        margins.append(margin_Bl)
        # each guided logit: (1 + t) cond - t uncond, so its error is (1 + 2t) that of one logit; the sampler's own
        # softmax and cumulative sum over V add V roundings
        errors.append((1 + 2 * t) * rounding_bound(dt, stages, longest_sum(var), out_RlV.abs().max().item())
                      + var.V * unit_roundoff(dt))
    return toks, choices, margins, errors


def robust(margin_Bl: torch.Tensor, error: float) -> torch.Tensor:
    """Decisions that come out the same on every machine whose logits are within `error` of the exact ones: the
    exact margin is at least ours - 2 error, and must exceed 2 error for both machines to follow it."""
    return margin_Bl > 4 * error


CASES = []
for _fixture, _f in FIXTURES.items():
    for _kind in KINDS:
        for _sampler in _f['meta']['samplers']:
            for _knob in _f['meta']['knobs']:
                if _fixture == 'saln512' and not KINDS[_kind] and tuple(_knob) != (3, 3):
                    continue   # the knob does nothing for VAR: one case per sampler is enough at L = 2240
                for _dtype in DTYPES:
                    # at L = 2240 a call takes seconds: the everyday tier runs one 512 case per dtype
                    everyday = _fixture == 'tiny' or (_kind, _sampler, tuple(_knob)) == ('viar', 'topk_topp', (4, 2))
                    CASES.append(pytest.param(_fixture, _kind, _sampler, tuple(_knob), _dtype,
                                              marks=() if everyday else pytest.mark.slow,
                                              id=f'{_fixture}-{_kind}-{_sampler}-{_knob[0]}_{_knob[1]}-{_dtype}'))


@pytest.mark.parametrize('fixture,kind,sampler,knob,dtype', CASES)
def test_sampled_tokens_equal_the_official(fixture, kind, sampler, knob, dtype):
    """Every scale's token map, greedy and top-k/top-p, official knobs and official KV behaviour."""
    dt = DTYPES[dtype]
    vae, var = our_models(fixture, kind, dt)
    want = official(fixture, kind, dt)['samples'][(sampler, *knob)]
    got, choices, margins, errors = sample_with_margins(vae, var, FIXTURES[fixture]['meta'], sampler, knob)
    assert len(got) == len(want) == len(var.patch_nums)
    for k, (a, b, c, m, e) in enumerate(zip(got, want, choices, margins, errors)):
        sure = robust(m, e)
        differ = a != b
        assert not (differ & sure).any(), f'scale {k}: {(differ & sure).sum().item()} of {a.numel()} tokens differ'
        # the margins are those of the sampler's own decisions: the replayed draws give its tokens
        assert torch.equal(c, a), f'scale {k}: the decisions replayed from our logits are not the sampler\'s'
        if dt == torch.float64:   # far from every tie: these tokens are the same on any CPU
            assert sure.all(), (f'scale {k}: {(~sure).sum().item()} decisions within 4 x {e:.1e} of a tie '
                                f'(smallest margin {m.min().item():.2e}); regenerate the fixture with another seed')
        if differ.any():   # a decision inside the rounding error went the other way: later scales see other tokens
            break


@pytest.mark.parametrize('knob', [(3, 3), (4, 2)])
def test_fill_forward_default_equals_the_official_for_non_increasing_knobs(knob):
    """The default KV rule differs from the official one only where a scale runs more iterations than an
    earlier one; the fixture's non-increasing knobs must give the official tokens with the default too."""
    counts = official_iters(*knob, len(FIXTURES['tiny']['meta']['sizes']['patch_nums']))
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    vae, var = our_models('tiny', 'viar', torch.float64)
    want = FIXTURES['tiny']['viar']['fp64']['samples'][('topk_topp', *knob)]
    got, choices, margins, errors = sample_with_margins(vae, var, FIXTURES['tiny']['meta'], 'topk_topp', knob,
                                                        fill_forward=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, c) for a, c in zip(got, choices))
    assert all(robust(m, e).all() for m, e in zip(margins, errors))
