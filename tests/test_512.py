"""512 px: VAR-d36-s (`var_d36.pth`: depth 36, shared AdaLN, pyramid 1..32) and tiny models of that layout.

The key/shape list in tests/data/official_var_d36_keys.json was written by the OFFICIAL code
(`tests/make_official_fixture.py PATH --keys var_d36`); this project's meta build must match every entry.
A file of that layout carries no config: depth, shared AdaLN and the pyramid are read off its weights
(`pos_1LC` has 2240 tokens at 512 px, 680 at 256 px), and gen_img.py / sampling.py sample at 512 px from it.
"""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from models import VQVAE, build_var
from models.config import ModelSpec, spec_from_state_dict
from models.layout import PYRAMIDS, num_tokens

DATA = os.path.join(os.path.dirname(__file__), 'data')
D36 = json.load(open(os.path.join(DATA, 'official_var_d36_keys.json')))
# the official tokenizer's layout (16x downsampling) at ch 32 with one res block: 512 px images, cheap weights
TINY_VAE = dict(V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1, 2, 2, 4), vae_num_res_blocks=1)


def test_var_d36_meta_build_matches_every_official_key_and_shape():
    assert D36['depth'] == 36 and D36['shared_aln'] and tuple(D36['patch_nums']) == PYRAMIDS[512]
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True,
                    v_patch_nums=PYRAMIDS[512])
        var = build_var(vae, depth=36, embed_dim=64 * 36, num_heads=36, attn_l2_norm=True, shared_aln=True,
                        patch_nums=PYRAMIDS[512], drop_path_rate=0.1 * 36 / 24)
    got = {k: list(v.shape) for k, v in var.state_dict().items()}
    want = D36['keys']
    assert len(want) == 446
    assert sorted(set(want) - set(got)) == [], 'missing official keys'
    assert sorted(set(got) - set(want)) == [], 'keys the official file lacks'
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    assert sum(p.numel() for p in var.parameters()) == D36['param_count'] == 2_353_893_904
    # read back off the (meta) weights: what load_models builds for var_d36.pth without any flag
    spec = spec_from_state_dict(var.state_dict())
    assert (spec.depth, spec.width, spec.heads, spec.shared_aln, spec.patch_nums) == (36, 2304, 36, True, PYRAMIDS[512])


def test_var_d36_is_an_official_name_with_its_default_path():
    from utils.checkpoint import OFFICIAL_FILES
    from utils.model_io import default_var_ckpt
    assert OFFICIAL_FILES['var_d36.pth'] == 'FoundationVision/var'
    assert default_var_ckpt(ModelSpec(depth=36)) == 'ckpts/var_d36.pth'


def _tiny_512(use_implicit: bool, shared_aln: bool = True, seed: int = 0):
    spec = ModelSpec(depth=4, use_implicit=use_implicit, pre_depth=1, post_depth=1, embed_dim=16, num_heads=2,
                     patch_nums=PYRAMIDS[512], num_classes=5, shared_aln=shared_aln, **TINY_VAE)
    torch.manual_seed(seed)
    vae, var = spec.build('cpu')
    return spec, vae.eval(), var.eval()


@pytest.mark.parametrize('use_implicit', [False, True])
def test_spec_from_state_dict_reads_shared_adaln_and_the_512_pyramid(use_implicit):
    spec, _, var = _tiny_512(use_implicit)
    sd = var.state_dict()
    assert sd['pos_1LC'].shape[1] == num_tokens(PYRAMIDS[512]) == 2240
    got = spec_from_state_dict(sd, ModelSpec())   # a 256 px fallback: the weights must win
    assert got.shared_aln and got.patch_nums == PYRAMIDS[512]
    assert (got.use_implicit, got.width, got.heads, got.num_classes) == (use_implicit, 16, 2, 5)
    assert (got.pre_depth, got.post_depth) == ((1, 1) if use_implicit else (5, 5))
    # and without shared AdaLN on the 256 pyramid nothing is invented
    _, _, var256 = _tiny_512(use_implicit, shared_aln=False)
    plain = spec_from_state_dict({k: v for k, v in var256.state_dict().items()}, ModelSpec())
    assert not plain.shared_aln


@pytest.fixture(scope='module')
def official_layout_files(tmp_path_factory):
    """A bare state dict of a tiny shared-AdaLN 512-pyramid VAR (the official files' layout: no config) and
    its tokenizer file."""
    from utils.checkpoint import save_atomic
    spec, vae, var = _tiny_512(False, seed=3)
    with torch.no_grad():   # random gates and head so the samples depend on the weights
        for name, p in var.named_parameters():
            if 'ada' in name or name.startswith('head.'):
                p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp('official512')
    save_atomic(var.state_dict(), str(d / 'var_tiny512.pth'))
    save_atomic(vae.state_dict(), str(d / 'vae_tiny512.pth'))
    return str(d / 'var_tiny512.pth'), str(d / 'vae_tiny512.pth'), var


def test_official_layout_file_loads_strictly_with_everything_read_from_it(official_layout_files):
    from utils.checkpoint import CheckpointError, load_var_weights
    from utils.model_io import load_models
    var_path, vae_path, ref = official_layout_files
    notes = []
    vae, var, spec = load_models(var_path, vae_path, given=dict(depth=30), spec=ModelSpec(depth=30),
                                 log=notes.append)
    assert (spec.depth, spec.shared_aln, spec.patch_nums, spec.image_px) == (4, True, PYRAMIDS[512], 512)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in var.state_dict().items())
    assert len(notes) == 1 and '--depth 30 (file: 4)' in notes[0]   # a typed flag the file overrides: one warning
    # the strict helper names what the file is when the model built does not fit it (no shared AdaLN here)
    _, _, plain = _tiny_512(False, shared_aln=False)
    with pytest.raises(CheckpointError, match=r'is a VAR checkpoint \(depth 4, width 16, shared AdaLN, 10 scales up '
                                              r'to 32x32\), but the model built is .*width 16, 10 scales'):
        load_var_weights(plain, var_path)


@pytest.mark.slow
def test_gen_img_samples_512px_from_the_file(official_layout_files, tmp_path):
    import gen_img
    var_path, vae_path, _ = official_layout_files
    gen_img.main(['--var_ckpt', var_path, '--vae_ckpt', vae_path, '--device', 'cpu', '--class_label', '2',
                  '--seeds', '0', '--top_k', '0', '--top_p', '0', '--progress', 'False', '--output_dir', str(tmp_path)])
    img = np.asarray(Image.open(tmp_path / 'var_tiny512' / 'class2_seed0.png'))
    assert img.shape == (512, 512, 3) and img.std() > 0


@pytest.mark.slow
def test_sampling_script_samples_512px_from_the_file(official_layout_files, tmp_path):
    import sampling
    var_path, vae_path, _ = official_layout_files
    npz = sampling.main(['--ckpt_path', var_path, '--vae_ckpt', vae_path, '--num_classes', '1', '--per_class', '1',
                         '--batch_size', '1', '--device', 'cpu', '--dtype', 'fp32', '--progress', 'False',
                         '--sample_dir', str(tmp_path)])
    with np.load(npz) as f:
        assert f['arr_0'].shape == (1, 512, 512, 3)


@pytest.mark.slow
def test_viar_trains_at_512_with_the_pn_shortcut(tmp_path):
    """--pn=512 --use_implicit=True at tiny width; 2x tokenizer downsampling keeps the images at 64 px."""
    import train
    from tests.train_helpers import make_image_folder, read_steps, tiny_flags
    from utils.model_io import load_models
    data = make_image_folder(str(tmp_path / 'imgs'), classes=2, per_class=2, val_per_class=1, size=64)
    out = str(tmp_path / 'out')
    train.main(tiny_flags(data, out, True, '--pn=512', '--patch_size=2', '--vae_ch_mult=1_1', '--bs=2',
                          '--max_steps=2', '--mid_reso=1.0', '--width=16'))
    steps = read_steps(os.path.join(out, 'steps-rank0.jsonl'))
    assert sorted(steps) == [1, 2] and all(np.isfinite(s['loss']) for s in steps.values())
    _, var, spec = load_models(os.path.join(out, 'viar-slim.pth'), '')
    assert spec.use_implicit and spec.patch_nums == PYRAMIDS[512] and var.L == 2240
