"""Zero-shot editing: mask downsampling rule, forced tokens outside the mask, and gen_img's edit mode."""
import math
import os

import numpy as np
import PIL.Image as PImage
import pytest
import torch

import gen_img
from models import schedules as S
from utils.sample import image_io
from utils.sample.editing import box_mask, make_edit_spec, mask_to_scale, mode_mask, parse_box
from tests.test_gen_img import FAST, RES, export_tiny, read_png
from tests.tiny import TINY_PN, tiny_vae_var


def reference_mask_to_scale(mask_HW: torch.Tensor, pn: int) -> torch.Tensor:
    """Loop version of the rule: cell (i, j) spans rows floor(i*H/pn)..ceil((i+1)*H/pn); any masked pixel."""
    H, W = mask_HW.shape
    out = torch.zeros(pn, pn, dtype=torch.bool)
    for i in range(pn):
        for j in range(pn):
            r0, r1 = (i * H) // pn, math.ceil((i + 1) * H / pn)
            c0, c1 = (j * W) // pn, math.ceil((j + 1) * W / pn)
            out[i, j] = bool(mask_HW[r0:r1, c0:c1].any())
    return out.flatten()


def test_mask_downsampling_on_a_hand_made_mask():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 6] = True   # one pixel: row 5, column 6
    cells = {pn: set(torch.nonzero(mask_to_scale(mask, pn)[0]).flatten().tolist()) for pn in (1, 2, 3, 4, 8)}
    assert cells[1] == {0}                      # the 1x1 scale is regenerated whenever anything is masked
    assert cells[2] == {1 * 2 + 1}              # cell (1, 1)
    assert cells[4] == {2 * 4 + 3}              # cell (2, 3)
    assert cells[8] == {5 * 8 + 6}              # pixel resolution: exactly the pixel
    # pn = 3 on 8 px: row cells 0..2, 2..5, 5..7 overlap, so row 5 lies in cells 1 and 2; column 6 only in 2
    assert cells[3] == {1 * 3 + 2, 2 * 3 + 2}


@pytest.mark.parametrize('pn', [1, 2, 3, 5, 6, 7, 13, 16])
def test_mask_downsampling_matches_the_rule_on_random_masks(pn):
    g = torch.Generator().manual_seed(pn)
    mask = torch.rand(3, 32, 32, generator=g) > 0.97
    got = mask_to_scale(mask, pn)
    assert got.shape == (3, pn * pn)
    for b in range(3):
        assert torch.equal(got[b], reference_mask_to_scale(mask[b], pn))


def test_box_masks_inpaint_and_outpaint_are_complements():
    inside = box_mask(2, 8, 8, (0.25, 0.5, 0.75, 1.0))
    assert inside.shape == (2, 8, 8)
    assert inside[:, 4:8, 2:6].all() and inside.sum() == 2 * 16
    assert torch.equal(mode_mask('outpaint', 2, 8, 8, (0.25, 0.5, 0.75, 1.0)), ~inside)
    assert torch.equal(mode_mask('inpaint', 2, 8, 8, (0.25, 0.5, 0.75, 1.0)), inside)


@pytest.mark.parametrize('bad', ['0,0,1', '0,0,1,x', '0.5,0,0.5,1', '0,0,1.5,1', (-0.1, 0, 1, 1)])
def test_parse_box_rejects_bad_boxes(bad):
    with pytest.raises(ValueError):
        parse_box(bad)


def random_image(B=1, seed=0):
    return torch.rand(B, 3, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def edit_images(var, vae, img_B3HW, mask_BHW, label_B, **sample_kw):
    """Edited images (B, 3, H, W) in [0, 1]: sample inside the mask under label_B, keep the rest."""
    spec = make_edit_spec(vae, img_B3HW, mask_BHW, var.patch_nums)
    return var.autoregressive_infer_cfg(img_B3HW.shape[0], label_B, edit=spec, **sample_kw)


def capture_tokens(var, B, label_B, **kw):
    """Sample and record the token map fed to the codebook at every scale."""
    tokens = []
    hook = var.vae_quant_proxy[0].embedding.register_forward_pre_hook(lambda m, i: tokens.append(i[0].clone()))
    try:
        img = var.autoregressive_infer_cfg(B, label_B, **kw)
    finally:
        hook.remove()
    return img, tokens


@pytest.mark.parametrize('use_implicit', [False, True])
def test_tokens_outside_the_mask_are_the_images_own_tokens(use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    img = random_image(2)
    mask = torch.stack([box_mask(1, RES, RES, (0.5, 0.0, 1.0, 0.5))[0], mode_mask('outpaint', 1, RES, RES, (0.25, 0.25, 0.75, 0.75))[0]])
    spec = make_edit_spec(vae, img, mask, var.patch_nums)
    assert [t.shape for t in spec.gt_idx_Bl] == [(2, pn * pn) for pn in TINY_PN]
    _, tokens = capture_tokens(var, 2, torch.tensor([1, 3]), g_seed=4, top_k=0, top_p=0.0, edit=spec,
                               schedule=S.constant(2, len(TINY_PN)))
    assert len(tokens) == len(TINY_PN)
    changed = 0
    for si, pn in enumerate(TINY_PN):
        keep = spec.keep_Bl[si]
        assert torch.equal(keep, ~mask_to_scale(mask, pn))
        assert torch.equal(tokens[si][keep], spec.gt_idx_Bl[si][keep])
        changed += int((tokens[si][~keep] != spec.gt_idx_Bl[si][~keep]).sum())
    assert changed > 0   # inside the mask the model really samples


def test_without_edit_the_same_call_does_not_reproduce_the_image():
    """Sanity for the test above: the forcing is what makes the tokens equal."""
    vae, var = tiny_vae_var(True)
    img = random_image(1)
    spec = make_edit_spec(vae, img, box_mask(1, RES, RES, (0, 0, 0.5, 0.5)), var.patch_nums)
    _, tokens = capture_tokens(var, 1, torch.tensor([1]), g_seed=4, top_k=0, top_p=0.0)
    assert any(not torch.equal(t, gt) for t, gt in zip(tokens, spec.gt_idx_Bl))


def test_empty_mask_reconstructs_and_full_mask_samples_freely():
    vae, var = tiny_vae_var(True)
    img, label = random_image(1), torch.tensor([2])
    kw = dict(g_seed=3, top_k=0, top_p=0.0, schedule=S.constant(2, len(TINY_PN)))
    kept = edit_images(var, vae, img, torch.zeros(1, RES, RES, dtype=torch.bool), label, **kw)
    with torch.no_grad():
        recon = vae.idxBl_to_img(vae.img_to_idxBl(img), same_shape=True, last_one=True).add(1).mul(0.5)
    assert torch.allclose(kept, recon, atol=1e-5)
    free = edit_images(var, vae, img, torch.ones(1, RES, RES, dtype=torch.bool), label, **kw)
    assert torch.allclose(free, var.autoregressive_infer_cfg(1, label, **kw), atol=1e-6)


def test_class_conditional_edit_changes_only_the_region():
    vae, var = tiny_vae_var(False)
    img = random_image(1)
    mask = box_mask(1, RES, RES, (0.5, 0.5, 1.0, 1.0))
    spec = make_edit_spec(vae, img, mask, var.patch_nums)
    kw = dict(g_seed=1, top_k=0, top_p=0.0, edit=spec)
    _, tok_a = capture_tokens(var, 1, torch.tensor([0]), **kw)
    _, tok_b = capture_tokens(var, 1, torch.tensor([4]), **kw)
    for si in range(len(TINY_PN)):
        keep = spec.keep_Bl[si]
        assert torch.equal(tok_a[si][keep], tok_b[si][keep])
    assert any(not torch.equal(a, b) for a, b in zip(tok_a, tok_b))


def test_make_edit_spec_checks_shapes():
    vae, var = tiny_vae_var(False)
    with pytest.raises(ValueError, match='does not match'):
        make_edit_spec(vae, random_image(1), torch.zeros(1, RES, RES + 1, dtype=torch.bool), var.patch_nums)


# ---------------------------------------------------------------- image files and gen_img's edit mode

def test_load_mask_size_mismatch_and_missing_image(tmp_path):
    PImage.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / 'mask.png')
    with pytest.raises(image_io.ImageInputError, match='is 12x10 but the image is 16x16'):
        image_io.load_mask(str(tmp_path / 'mask.png'), RES, (16, 16))
    with pytest.raises(image_io.ImageInputError, match='does not exist'):
        image_io.load_image(str(tmp_path / 'nope.png'), RES)


def test_load_mask_white_means_regenerate(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[:8, :] = 255   # top half white
    PImage.fromarray(m).save(tmp_path / 'mask.png')
    mask = image_io.load_mask(str(tmp_path / 'mask.png'), RES, (16, 16))
    assert mask.dtype == torch.bool and mask.shape == (1, RES, RES)
    assert mask[0, :4].all() and not mask[0, 4:].any()


@pytest.fixture(scope='module')
def var_ckpt(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp('ckpt'), use_implicit=False)


def write_input(tmp_path):
    arr = (np.random.default_rng(0).random((16, 20, 3)) * 255).astype(np.uint8)
    PImage.fromarray(arr).save(tmp_path / 'in.png')
    return str(tmp_path / 'in.png')


def run_edit(ckpt, tmp_path, *extra):
    return gen_img.main(['--var_ckpt', ckpt, '--vae_ckpt', '', '--device', 'cpu', '--output_dir', str(tmp_path / 'out'),
                         '--edit_image', write_input(tmp_path), *FAST, *map(str, extra)])


def test_gen_img_edit_mode_writes_input_mask_and_edits(var_ckpt, tmp_path):
    paths = run_edit(var_ckpt, tmp_path, '--edit_box', '0,0,0.5,1', '--edit_mode', 'outpaint', '--edit_class', 2,
                     '--seeds', 1, 2)
    out = tmp_path / 'out' / 'tiny_var'
    written = sorted(n for n in os.listdir(out) if n != gen_img.MODEL_RECORD)
    assert written == sorted(map(os.path.basename, paths)) == ['edit_class2_seed1.png', 'edit_class2_seed2.png', 'edit_class2_seeds1_2_grid.png',
                                       'edit_input.png', 'edit_mask.png', 'edit_recon.png']
    mask = read_png(out / 'edit_mask.png')
    assert mask.shape == (RES, RES, 3)
    assert (mask[:, RES // 2:] == 255).all() and (mask[:, :RES // 2] == 0).all()   # outpaint: right half redrawn


def test_gen_img_edit_with_a_mask_png(var_ckpt, tmp_path):
    m = np.zeros((16, 20), np.uint8)
    m[2:6, 4:9] = 255
    PImage.fromarray(m).save(tmp_path / 'mask.png')
    run_edit(var_ckpt, tmp_path, '--edit_mask', tmp_path / 'mask.png', '--class_label', 0, '--seeds', 3)
    out = tmp_path / 'out' / 'tiny_var'
    assert {'edit_class0_seed3.png', 'edit_input.png', 'edit_mask.png'} <= set(os.listdir(out))


def test_gen_img_edit_mask_size_mismatch_exits(var_ckpt, tmp_path):
    PImage.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / 'mask.png')
    with pytest.raises(SystemExit, match='draw the mask at the image size'):
        run_edit(var_ckpt, tmp_path, '--edit_mask', tmp_path / 'mask.png', '--class_label', 0)


def test_gen_img_empty_mask_exits(var_ckpt, tmp_path):
    PImage.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / 'mask.png')
    with pytest.raises(SystemExit, match='mask is empty'):
        run_edit(var_ckpt, tmp_path, '--edit_mask', tmp_path / 'mask.png', '--class_label', 0)
