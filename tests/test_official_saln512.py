"""Same numbers as the official code for shared AdaLN on the 512 px pyramid: tests/data/official_tiny_saln512.pt.

Written by `scripts/make_official_fixture.py PATH --config tiny_saln512` running the official mobiushy/VIAR
code: VAR and VIAR (depth 4, width 16, 2 heads, pre/post 1/1, V 48, Cvae 8, 5 classes) with `shared_aln=True`
(VAR-d36-s's `--saln=1`) on the pyramid 1,2,3,4,6,9,13,18,24,32 (L = 2240, VAR's `--pn=512`), every weight
~ N(0, 0.3^2). The (1, 1, L, L) attention mask is stored as its sha256 (20 MB otherwise). The state dicts load
strictly into this project's models; logits and every scale's sampled tokens must equal the official ones.
tests/test_official_fixture.py (the non-shared 4-scale fixture) is a separate file and stays as it is.
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
from utils.checkpoint import load_var_weights

FIXTURE = torch.load(os.path.join(os.path.dirname(__file__), 'data', 'official_tiny_saln512.pt'), weights_only=True)
META = FIXTURE['meta']
KINDS = {'var': False, 'viar': True}


def mask_sha256(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.float().contiguous().numpy().tobytes()).hexdigest()


def our_models(kind: str):
    """This project's models with the fixture's weights (strict load; the mask is checked by its digest)."""
    s, fx = META['sizes'], FIXTURE[kind]
    # only the quantizer matters for tokens; a 2x decoder keeps the final decode cheap (64 px instead of 512)
    vae = VQVAE(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=tuple(s['patch_nums']), ch_mult=(1, 1), num_res_blocks=1)
    vae.quantize.load_state_dict(fx['quant_sd'], strict=True)
    var = build_var(vae, depth=s['depth'], use_implicit=KINDS[kind], pre_depth=s['pre_depth'],
                    post_depth=s['post_depth'], embed_dim=s['embed_dim'], num_heads=s['num_heads'],
                    num_classes=s['num_classes'], attn_l2_norm=True, patch_nums=tuple(s['patch_nums']),
                    drop_path_rate=0.0, shared_aln=META['shared_aln'])
    mask = var.state_dict()['attn_bias_for_masking']
    assert tuple(mask.shape) == tuple(fx['mask_shape']) and mask_sha256(mask) == fx['mask_sha256']
    load_var_weights(var, dict(fx['var_sd'], attn_bias_for_masking=mask))
    var.cond_drop_rate = 0.0
    return vae.eval(), var.eval()


def test_fixture_is_the_shared_adaln_512_configuration():
    assert META['shared_aln'] is True and tuple(META['sizes']['patch_nums']) == PYRAMIDS[512]
    for kind in KINDS:
        sd = FIXTURE[kind]['var_sd']
        assert 'shared_ada_lin.1.weight' in sd and sd['pos_1LC'].shape[1] == 2240
        assert not any('ada_lin' in k for k in sd if k.startswith(('blocks.', 'pre_blocks.', 'post_blocks.', 'implicit_block.')))


@pytest.mark.parametrize('kind', KINDS)
def test_teacher_forced_logits_equal_the_official(kind):
    vae, var = our_models(kind)
    fx = FIXTURE[kind]
    with torch.no_grad():
        x_BLCv = vae.quantize.idxBl_to_var_input(fx['idx_Bl'])
        torch.testing.assert_close(x_BLCv, fx['x_BLCv'], atol=1e-6, rtol=1e-6)
        logits_BLV = var(torch.tensor(META['labels_train']), fx['x_BLCv'], jfb_iters=(2, 1) if KINDS[kind] else None)
    assert logits_BLV.std() > 0.1
    torch.testing.assert_close(logits_BLV, fx['logits_BLV'], atol=1e-5, rtol=1e-5)


# the knob does nothing for VAR: one case each sampler. At L = 2240 a call takes seconds on a loaded CPU core,
# so the everyday tier runs one case (VIAR top-k/top-p Dec.(4,2)) and the rest are marked slow.
EVERYDAY = {('viar', 'topk_topp', (4, 2))}
CASES = [pytest.param(kind, sampler, tuple(knob), marks=() if (kind, sampler, tuple(knob)) in EVERYDAY
                      else pytest.mark.slow)
         for kind in KINDS for sampler in META['samplers'] for knob in META['knobs'] if KINDS[kind] or tuple(knob) == (3, 3)]


@pytest.mark.parametrize('kind,sampler,knob', CASES)
def test_sampled_tokens_equal_the_official(kind, sampler, knob):
    """Every scale's token map of the 10-scale 512 px pyramid, greedy and top-k/top-p, official KV behaviour."""
    vae, var = our_models(kind)
    want = FIXTURE[kind]['samples'][(sampler, *knob)]
    toks = []
    schedule = S.explicit(official_iters(*knob, len(var.patch_nums)), len(var.patch_nums))
    hook = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
    try:
        with torch.no_grad():
            var.autoregressive_infer_cfg(len(META['labels_sample']), torch.tensor(META['labels_sample']),
                                         g_seed=META['g_seed'], cfg=META['cfg'], schedule=schedule,
                                         fill_forward=False, **META['samplers'][sampler])
    finally:
        hook.remove()
    assert len(toks) == len(want) == 10
    for k, (a, b) in enumerate(zip(toks, want)):
        assert torch.equal(a, b), f'scale {k}: {(a != b).sum().item()} of {a.numel()} tokens differ'
