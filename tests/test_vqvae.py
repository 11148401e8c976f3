"""Multi-scale VQVAE: checkpoint layout, encode/decode invariants, teacher-forcing input, usage EMA."""
import ast
import io
import json
import os

import numpy as np
import pytest
import torch

from models.quant import (VectorQuantizer2, ema_hit_update, nearest_tick, phi_ticks, scale_position,
                          usage_margin)
from models.vqvae import VQVAE

KEYS_JSON = os.path.join(os.path.dirname(__file__), 'data', 'official_checkpoint_keys.json')
PATCH_NUMS = (1, 2, 3, 4)
TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=PATCH_NUMS)
IMG = 8  # 8 px images, downsample 2 -> 4x4 latent = last patch num


def tiny_vae(seed: int = 0, **kw) -> VQVAE:
    """A tiny tokenizer whose codebook is spread like its latents, so many codes get picked."""
    torch.manual_seed(seed)
    vae = VQVAE(**{**TINY, **kw})
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_(0, 0.3)
    return vae


def images(B: int = 3, seed: int = 1) -> torch.Tensor:
    """Random images in [-1, 1], (B, 3, IMG, IMG)."""
    return torch.rand(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def embed_scales(vae: VQVAE, idx_Bl_list):
    """Per-scale embeddings (B, Cvae, pn, pn) of token indices."""
    B = idx_Bl_list[0].shape[0]
    return [vae.quantize.embedding(idx).transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            for idx, pn in zip(idx_Bl_list, vae.quantize.v_patch_nums)]


# ---------------------------------------------------------------- (a) official layout
def test_official_vae_keys_shapes_and_param_count():
    with open(KEYS_JSON) as f:
        ref = json.load(f)
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4,
                    v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == ref['vae_ch160v4096z32']
    assert sum(p.numel() for p in vae.parameters()) == ref['param_counts']['vae_ch160v4096z32']
    assert (vae.Cvae, vae.V, vae.vocab_size, vae.downsample) == (32, 4096, 4096, 16)


def test_test_mode_freezes_and_train_mode_does_not():
    frozen, trainable = tiny_vae(), tiny_vae(test_mode=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())


def test_widths_not_divisible_by_groupnorm_are_rejected():
    with pytest.raises(ValueError, match='multiple of 32'):
        VQVAE(**{**TINY, 'ch': 48})


# ---------------------------------------------------------------- (b) state dict round trip
def test_state_dict_round_trip_is_exact():
    src, dst = tiny_vae(seed=0), tiny_vae(seed=1)
    with torch.no_grad():
        src.quantize.ema_vocab_hit_SV.uniform_(0, 3)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf), strict=True)
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = images()
    assert all(torch.equal(a, b) for a, b in zip(src.img_to_idxBl(x), dst.img_to_idxBl(x)))


def test_load_tolerates_other_scale_count_without_mutating_input():
    vae = tiny_vae()
    sd = tiny_vae(seed=3, v_patch_nums=(1, 4)).state_dict()  # its ema buffer has 2 scales, ours 4
    theirs = sd['quantize.ema_vocab_hit_SV']
    vae.load_state_dict(sd, strict=True)
    assert sd['quantize.ema_vocab_hit_SV'] is theirs
    assert vae.quantize.ema_vocab_hit_SV.shape == (len(PATCH_NUMS), TINY['vocab_size'])
    assert torch.equal(vae.quantize.embedding.weight, sd['quantize.embedding.weight'])


# ---------------------------------------------------------------- (c) token maps
def test_img_to_idxBl_shapes_per_scale():
    vae, x = tiny_vae(), images(B=3)
    idx = vae.img_to_idxBl(x)
    assert [tuple(t.shape) for t in idx] == [(3, pn * pn) for pn in PATCH_NUMS]
    assert all(t.dtype == torch.long and 0 <= t.min() and t.max() < TINY['vocab_size'] for t in idx)
    custom = vae.img_to_idxBl(x, v_patch_nums=(2, (1, 3), 4))
    assert [tuple(t.shape) for t in custom] == [(3, 4), (3, 3), (3, 16)]


def test_image_size_must_match_last_patch_num():
    vae = tiny_vae()
    with pytest.raises(ValueError, match='last patch num'):
        vae.img_to_idxBl(torch.zeros(1, 3, 2 * IMG, 2 * IMG))


# ---------------------------------------------------------------- (d) teacher forcing == autoregressive stepping
def test_var_input_equals_stepping_autoregressively():
    vae, x = tiny_vae(), images()
    q, SN = vae.quantize, len(PATCH_NUMS)
    idx = vae.img_to_idxBl(x)
    var_in = q.idxBl_to_var_input(idx)
    B, C = x.shape[0], vae.Cvae
    assert var_in.shape == (B, sum(pn * pn for pn in PATCH_NUMS) - PATCH_NUMS[0] ** 2, C)
    assert var_in.dtype == torch.float32

    f_hat = torch.zeros(B, C, PATCH_NUMS[-1], PATCH_NUMS[-1])
    f_hat_id = id(f_hat)
    stepped = []
    for si, h_BChw in enumerate(embed_scales(vae, idx)):
        f_hat, next_map = q.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
        if si < SN - 1:
            stepped.append(next_map.flatten(2).transpose(1, 2))
    assert id(f_hat) == f_hat_id  # f_hat is updated in place, as VAR's sampler relies on
    torch.testing.assert_close(var_in, torch.cat(stepped, dim=1), rtol=0, atol=1e-6)
    # after the last scale, f_hat is what encoding produced
    torch.testing.assert_close(f_hat, q.f_to_idxBl_or_fhat(vae.img_to_f(x), to_fhat=True)[-1], rtol=0, atol=1e-5)


def test_prog_si_truncates_scales():
    vae, x = tiny_vae(), images()
    q = vae.quantize
    full_idx, full_in = vae.img_to_idxBl(x), q.idxBl_to_var_input(vae.img_to_idxBl(x))
    assert len(vae.img_to_idxBl(x, prog_si=1)) == 2
    assert torch.equal(q.idxBl_to_var_input(full_idx, prog_si=1), full_in[:, :PATCH_NUMS[1] ** 2])
    assert q.idxBl_to_var_input(full_idx, prog_si=0).shape == (x.shape[0], 0, vae.Cvae)


# ---------------------------------------------------------------- (e) decoding shapes and range
def test_decoding_shapes_and_clamped_range():
    vae, x = tiny_vae(), images()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(100)  # push raw outputs well outside [-1, 1]
    raw, _, _ = vae(x)
    assert raw.abs().max() > 1  # so the range checks below can fail
    f_hat = vae.quantize.f_to_idxBl_or_fhat(vae.img_to_f(x), to_fhat=True)[-1]
    img = vae.fhat_to_img(f_hat)
    recs = vae.img_to_reconstructed_img(x)
    last = vae.img_to_reconstructed_img(x, last_one=True)
    assert img.shape == x.shape and len(recs) == len(PATCH_NUMS)
    for r in recs + [img, last]:
        assert r.shape == x.shape and r.min() >= -1 and r.max() <= 1
    torch.testing.assert_close(last, recs[-1])
    # the straight-through sum (f_hat - f) + f rounds differently, and the x100 weights amplify that
    torch.testing.assert_close(img, raw.clamp(-1, 1), rtol=0, atol=1e-3)


# ---------------------------------------------------------------- (f) encoding == summing embeddings
def test_fhat_from_encoding_equals_embed_to_fhat():
    vae, x = tiny_vae(), images()
    f = vae.img_to_f(x)
    f_hats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
    idx = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
    ms_h = embed_scales(vae, idx)
    summed = vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=False)
    assert len(summed) == len(f_hats)
    for a, b in zip(summed, f_hats):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.quantize.embed_to_fhat(ms_h, last_one=True), f_hats[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.idxBl_to_img(idx, same_shape=True, last_one=True),
                               vae.fhat_to_img(f_hats[-1]), rtol=0, atol=1e-5)
    per_scale = vae.idxBl_to_img(idx, same_shape=False)
    assert [tuple(im.shape[-2:]) for im in per_scale] == [(pn * vae.downsample,) * 2 for pn in PATCH_NUMS]


# ---------------------------------------------------------------- (g) training forward
def test_training_forward_loss_and_gradients():
    vae, x = tiny_vae(test_mode=False), images()
    vae.train()
    rec, usages, vq_loss = vae(x, ret_usages=True)
    assert rec.shape == x.shape and torch.isfinite(vq_loss) and vq_loss.ndim == 0 and vq_loss > 0
    assert len(usages) == len(PATCH_NUMS)
    (rec.square().mean() + vq_loss).backward()
    for name in ('encoder.conv_in.weight', 'quant_conv.weight', 'quantize.embedding.weight',
                 'quantize.quant_resi.qresi_ls.0.weight', 'post_quant_conv.weight', 'decoder.conv_out.weight'):
        g = dict(vae.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    hits = vae.quantize.last_hit_SV
    assert hits.shape == (len(PATCH_NUMS), TINY['vocab_size'])
    assert hits.sum(dim=1).tolist() == [float(x.shape[0] * pn * pn) for pn in PATCH_NUMS]


# ---------------------------------------------------------------- (h) usage EMA
def test_update_usage_follows_the_official_ema_rule():
    q = VectorQuantizer2(vocab_size=5, Cvae=4, using_znorm=False, v_patch_nums=(1, 2))
    h1, h2 = torch.tensor([[1., 0, 0, 0, 0], [2, 1, 0, 0, 1]]), torch.tensor([[0., 1, 0, 0, 0], [0, 0, 4, 0, 0]])
    q.update_usage(h1)
    # the counter advances per scale: scale 0 is copied, scale 1 already decays from zero
    torch.testing.assert_close(q.ema_vocab_hit_SV, torch.stack([h1[0], 0.1 * h1[1]]))
    before = q.ema_vocab_hit_SV.clone()
    q.update_usage(h2)
    torch.testing.assert_close(q.ema_vocab_hit_SV, 0.9 * before + 0.1 * h2)
    q.record_hit = 100
    before = q.ema_vocab_hit_SV.clone()
    q.update_usage(h1)
    torch.testing.assert_close(q.ema_vocab_hit_SV, 0.99 * before + 0.01 * h1)
    assert q.record_hit == 102
    with pytest.raises(ValueError, match='hit_SV must have shape'):
        q.update_usage(torch.zeros(3, 5))


def test_usage_percentages_scale_margin_with_world_size():
    q = VectorQuantizer2(vocab_size=4, Cvae=4, using_znorm=False, v_patch_nums=(1, 2))
    q.ema_vocab_hit_SV.copy_(torch.tensor([[0., 1, 2, 3], [4, 4, 0, 0]]))
    assert usage_margin(50, 4, world_size=2) == pytest.approx(2.0)
    assert q.usage_percentages(positions_per_rank=50, world_size=1) == [75.0, 50.0]  # margin 1
    assert q.usage_percentages(positions_per_rank=50, world_size=2) == [50.0, 50.0]  # margin 2


def test_ema_hit_update_is_in_place():
    ema = torch.ones(3)
    ema_hit_update(ema, torch.zeros(3), n_updates=500)
    torch.testing.assert_close(ema, torch.full((3,), 0.99))


# ---------------------------------------------------------------- Phi choice
@pytest.mark.parametrize('K', [1, 2, 3, 4, 6])
def test_phi_tick_choice_is_nearest_and_covers_all_phis(K):
    ticks = phi_ticks(K)
    margin = 1 / 3 / K if K == 4 else 1 / 2 / K
    assert ticks[0] == pytest.approx(margin) and ticks[-1] == pytest.approx(1 - margin)
    assert np.all(np.diff(ticks) > 0) if K > 1 else True
    SN = 10
    chosen = [nearest_tick(ticks, scale_position(si, SN)) for si in range(SN)]
    for si, k in enumerate(chosen):
        dists = np.abs(ticks - si / (SN - 1))
        assert dists[k] == dists.min()
    assert chosen == sorted(chosen) and set(chosen) == set(range(K))


def test_model_files_do_not_touch_torch_distributed():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'models')
    for name in ('basic_vae.py', 'quant.py', 'vqvae.py'):
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not imported & {'torch.distributed', 'dist', 'os'}, (name, imported)
        assert 'distributed' not in attrs and 'environ' not in attrs, name


def test_decoder_attention_multiplies_in_the_official_order():
    """Bit-identical decodes need the official operand layout: bmm(q (B,L,C), k (B,C,L)), then
    bmm(v (B,C,L), attn^T (B,L,L)), every operand contiguous. Another order is the same maths but other
    rounding (about 4e-6 on a tiny decoder), so this records the products the block runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from models.basic_vae import AttnBlock

    class RecordBmm(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.bmm.default:
                self.calls.append([(tuple(t.shape), t.is_contiguous()) for t in args[:2]])
            return func(*args, **(kwargs or {}))

    B, C, h, w = 2, 32, 3, 5
    block, x = AttnBlock(C).eval(), torch.randn(B, C, h, w)
    with torch.no_grad(), RecordBmm() as rec:
        out = block(x)
    L = h * w
    assert rec.calls == [[((B, L, C), True), ((B, C, L), True)], [((B, C, L), True), ((B, L, L), True)]]
    # and the block is still single-head softmax attention with a residual
    with torch.no_grad():
        q, k, v = block.qkv(block.norm(x)).view(B, 3, C, L).unbind(1)
        attn = torch.softmax(q.transpose(1, 2) @ k / C ** 0.5, dim=-1)
        ref = x + block.proj_out((v @ attn.transpose(1, 2)).view(B, C, h, w))
    torch.testing.assert_close(out, ref)
