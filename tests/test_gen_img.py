"""gen_img.py end to end on tiny slim exports, and the shared sampling config of utils/sample/config.py."""
import argparse
import os

import numpy as np
import PIL.Image as PImage
import pytest
import torch

import gen_img
from models import schedules as S
from utils.sample import image_io
from models.config import ModelSpec
from utils.checkpoint import save_atomic
from utils.cli import str2bool
from utils.model_io import slim_export
from utils.sample.compile_util import SamplingError, autocast_for, prepare_for_sampling
from utils.sample.config import SampleConfig, add_model_source_args, add_sample_args, configs_from, parse
from utils.sample.generate import class_ids, generate, image_list
from tests.conftest import needs_c_compiler
from tests.tiny import TINY_PN, tiny_vae_var
from tests.tiny import write_tiny_export

TINY_SPEC = dict(depth=4, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2, patch_nums=TINY_PN, V=48, Cvae=8,
                 vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1, num_classes=5)
RES = 8   # tiny models make 8 px images
CELL = RES * image_io.grid_scale(RES, RES)   # grids enlarge them (nearest neighbour) to 64 px
FAST = ['--top_k', '0', '--top_p', '0', '--iter_left', '3', '--iter_right', '2', '--progress', 'False']


def export_tiny(tmp_path, use_implicit: bool) -> str:
    """A tiny model saved as a slim export with its config and tokenizer; returns the path."""
    vae, var = tiny_vae_var(use_implicit)
    spec = ModelSpec(use_implicit=use_implicit, **TINY_SPEC)
    path = str(tmp_path / f'tiny_{"viar" if use_implicit else "var"}.pth')
    save_atomic(slim_export(var, spec, vae=vae), path)
    return path


@pytest.fixture(scope='module')
def viar_ckpt(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp('ckpt'), use_implicit=True)


def read_png(path: str) -> np.ndarray:
    return np.asarray(PImage.open(path).convert('RGB'))


def grid_size(n: int, nrow: int, h: int, w: int, padding: int = 2, scale: int = 1):
    """(height, width) in pixels of a torchvision grid of n images of h x w, each enlarged `scale` times."""
    cols = min(max(1, nrow), n)
    rows = -(-n // cols)
    return rows * (h * scale + padding) + padding, cols * (w * scale + padding) + padding


def upscaled(img_HW3: np.ndarray) -> np.ndarray:
    """An image as a grid cell shows it: each pixel a block of CELL // RES px."""
    k = CELL // RES
    return img_HW3.repeat(k, axis=0).repeat(k, axis=1)


def test_grid_scale_enlarges_small_images_to_a_readable_cell(tmp_path):
    """Grids of small images are enlarged by a whole factor to at least 64 px a cell, nearest neighbour (the
    demo's 16 px digits 4x, as in its own grid); large images keep their size; the single PNGs never change."""
    assert [image_io.grid_scale(s, s) for s in (8, 16, 20, 64, 256)] == [8, 4, 4, 1, 1]
    assert image_io.grid_scale(16, 256) == 4 and image_io.grid_scale(8, 8, min_cell=16) == 2
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    image_io.save_grid(imgs, str(tmp_path / 'g.png'), nrow=2)
    grid = read_png(tmp_path / 'g.png')
    assert grid.shape[:2] == grid_size(3, 2, 16, 16, scale=4) == (134, 134)
    first = image_io.to_uint8_HWC(imgs[0]).repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(grid[2:66, 2:66], first)
    big = torch.rand(2, 3, 64, 64)
    image_io.save_grid(big, str(tmp_path / 'big.png'), nrow=2)
    assert read_png(tmp_path / 'big.png').shape[:2] == grid_size(2, 2, 64, 64) == (68, 134)


def run(ckpt: str, out_dir, *extra) -> list:
    """gen_img.main on a slim export (its tokenizer is embedded: --vae_ckpt '')."""
    return gen_img.main(['--var_ckpt', ckpt, '--vae_ckpt', '', '--device', 'cpu', '--output_dir', str(out_dir),
                         *FAST, *map(str, extra)])


def test_writes_each_png_and_grid_and_matches_official_call(viar_ckpt, tmp_path):
    paths = run(viar_ckpt, tmp_path, '--class_label', 3, '--seeds', 5, 6, 7, '--nrow', 2)
    out = tmp_path / 'tiny_viar'
    names = sorted(n for n in os.listdir(out) if n != gen_img.MODEL_RECORD)
    assert names == ['class3_seed5.png', 'class3_seed6.png', 'class3_seed7.png', 'class3_seeds5_6_7_grid.png']
    assert sorted(map(os.path.basename, paths)) == names
    assert read_png(out / 'class3_seed5.png').shape == (RES, RES, 3)
    # 3 images of 8 px enlarged 8x, 2 per row, 2 px of padding around and between them: 2 rows x 2 columns,
    # 2 + 2 * (64 + 2) = 134 px each way, images at offsets 2 and 68, the fourth cell left white
    grid = read_png(out / 'class3_seeds5_6_7_grid.png')
    assert CELL == 64 and grid.shape == (134, 134, 3)
    for (y, x), seed in zip(((2, 2), (2, 68), (68, 2)), (5, 6, 7)):
        assert np.array_equal(grid[y:y + CELL, x:x + CELL], upscaled(read_png(out / f'class3_seed{seed}.png'))), seed
    assert (grid[68:132, 68:132] == 255).all()
    # each image is the official one-image call with g_seed = seed
    _, var = tiny_vae_var(True)
    for seed in (5, 7):
        ref = var.autoregressive_infer_cfg(1, torch.tensor([3]), g_seed=seed, top_k=0, top_p=0.0,
                                           schedule=S.decreasing(3, 2, len(TINY_PN)))
        assert np.array_equal(read_png(out / f'class3_seed{seed}.png'), image_io.to_uint8_HWC(ref[0]))


def test_two_classes_grid_rows_are_classes(viar_ckpt, tmp_path):
    run(viar_ckpt, tmp_path, '--class_label', 1, 4, '--seeds', 2, 3, 9)
    out = tmp_path / 'tiny_viar'
    grid = read_png(out / 'classes1_4_seeds2_3_9_grid.png')
    assert grid.shape == (134, 200, 3)   # 2 rows x 3 columns of 64 px cells, 2 px padding: 2 + 2 * 66, 2 + 3 * 66
    pad = 2
    for r, c in enumerate((1, 4)):
        for k, s in enumerate((2, 3, 9)):
            y, x = pad + r * (CELL + pad), pad + k * (CELL + pad)
            assert np.array_equal(grid[y:y + CELL, x:x + CELL], upscaled(read_png(out / f'class{c}_seed{s}.png')))
    assert not np.array_equal(read_png(out / 'class1_seed2.png'), read_png(out / 'class4_seed2.png'))


def test_batching_seeds_gives_the_same_images(tmp_path):
    _, var = tiny_vae_var(True)
    pairs = image_list([0, 2], [1, 2, 3])
    kw = dict(cfg=1.5, top_k=0, top_p=0.0, schedule=S.constant(2, len(TINY_PN)))
    sampler = prepare_for_sampling(var)
    one, _ = generate(sampler, pairs, 1, kw, progress=False)
    batched, _ = generate(sampler, pairs, 4, kw, progress=False)
    assert torch.allclose(one, batched, atol=1e-5)


@pytest.mark.slow
@needs_c_compiler
def test_compile_flag_gives_the_eager_images(viar_ckpt, tmp_path):
    """--compile (inductor on CPU: blocks, head, decoder) writes the eager images, up to float rounding."""
    greedy = ['--class_label', 2, '--seeds', 4, 9, '--top_k', 1, '--save_grid', False]
    eager = run(viar_ckpt, tmp_path / 'eager', *greedy)
    compiled = run(viar_ckpt, tmp_path / 'compiled', *greedy, '--compile')
    assert [os.path.basename(p) for p in compiled] == [os.path.basename(p) for p in eager]
    for a, b in zip(eager, compiled):
        diff = np.abs(read_png(a).astype(int) - read_png(b).astype(int))
        assert diff.max() <= 1, f'{os.path.basename(a)}: compiled differs from eager by {diff.max()} levels'


def test_random_weights_with_size_flags(tmp_path):
    flags = ['--var_ckpt', 'random', '--depth', 2, '--width', 32, '--heads', 2, '--patch_nums', '1,2,3,4',
             '--V', 48, '--Cvae', 8, '--vae_ch', 32, '--vae_ch_mult', '1,1', '--vae_num_res_blocks', 1,
             '--num_classes', 5, '--class_label', 0, '--seeds', 1, 2]
    gen_img.main(['--output_dir', str(tmp_path), *FAST, *map(str, flags)])
    assert sorted(os.listdir(tmp_path / 'random')) == [gen_img.MODEL_RECORD, 'class0_seed1.png', 'class0_seed2.png',
                                                       'class0_seeds1_2_grid.png']


def test_stats_report_iterations_and_kv_bytes(viar_ckpt, tmp_path, capsys):
    run(viar_ckpt, tmp_path, '--class_label', 0, '--seeds', 1, '--iters', '4,3,2,1')
    text = capsys.readouterr().out
    assert 'implicit iterations per scale: 4,3,2,1' in text and 'calls of the implicit block' in text
    assert 'KV cache:' in text


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize('extra,message', [
    (['--class_label', 5], 'out of range'),
    (['--class_label', 0, '--edit_image', 'missing.png', '--edit_box', '0,0,.5,.5'], 'does not exist'),
    (['--class_label', 0, '--edit_class', 9, '--edit_image', '{img}', '--edit_box', '0,0,.5,.5'], '--edit_class [9] out of range'),
    (['--class_label', 0, '--edit_image', '{img}'], 'exactly one of'),
    (['--class_label', 0, '--edit_image', '{img}', '--edit_box', '0.5,0,0.2,1'], '0 <= x0 < x1 <= 1'),
    (['--batch_size', 0], '--batch_size'),
])
def test_bad_inputs_exit_with_a_message(viar_ckpt, tmp_path, extra, message):
    img = tmp_path / 'in.png'
    PImage.fromarray(np.zeros((12, 12, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit) as e:
        run(viar_ckpt, tmp_path, *[str(a).replace('{img}', str(img)) for a in extra])
    assert message in str(e.value)


def test_bad_size_flags_are_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='cannot build the model'):
        gen_img.main(['--var_ckpt', 'random', '--depth', '2', '--vae_ch', '16', '--output_dir', str(tmp_path)])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='does not exist'):
        gen_img.main(['--var_ckpt', str(tmp_path / 'nope.pth'), '--output_dir', str(tmp_path)])


# ---------------------------------------------------------------- utils/sample/config.py

@pytest.mark.parametrize('text,want', [('True', True), ('true', True), ('1', True), ('yes', True),
                                       ('False', False), ('false', False), ('0', False), ('no', False)])
def test_str2bool(text, want):
    assert str2bool(text) is want


def test_str2bool_rejects_junk():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool('maybe')


def model_parser():
    p = argparse.ArgumentParser()
    add_model_source_args(p)
    add_sample_args(p)
    return p


def sample_config(argv) -> SampleConfig:
    return parse(model_parser(), argv)[2]


@pytest.mark.parametrize('argv,want', [([], False), (['--use_implicit'], True), (['--use_implicit', 'True'], True),
                                       (['--use_implicit', 'False'], False), (['--use_implicit', '--depth', '20'], True)])
def test_use_implicit_flag_forms(argv, want):
    assert parse(model_parser(), argv)[1].spec().use_implicit is want


def test_model_flags_map_to_spec():
    argv = ['--depth', '20', '--use_implicit', '--pre_depth', '3', '--ckpt_path', 'x.pth', '--width', '64',
            '--patch_nums', '1,2,4', '--V', '32', '--vae_ch_mult', '1,2']
    args, source, _ = parse(model_parser(), argv)
    spec = source.spec()
    assert args.var_ckpt == 'x.pth'
    assert (spec.depth, spec.use_implicit, spec.pre_depth, spec.post_depth) == (20, True, 3, 5)
    assert (spec.embed_dim, spec.patch_nums, spec.V, spec.vae_ch_mult) == (64, (1, 2, 4), 32, (1, 2))
    assert (spec.num_heads, spec.Cvae, spec.num_classes) == (None, 32, 1000)   # not given: official values
    assert set(source.typed) == {'depth', 'use_implicit', 'pre_depth', 'var_ckpt', 'embed_dim', 'patch_nums', 'V',
                                 'vae_ch_mult'}
    assert source.arch == dict(depth=20, use_implicit=True, pre_depth=3, embed_dim=64, patch_nums=(1, 2, 4), V=32,
                               vae_ch_mult=(1, 2))   # only what was given: a checkpoint sets the rest


K = 10


@pytest.mark.parametrize('argv,want', [
    ([], S.constant(10, K)),
    (['--iter_left', '20', '--iter_right', '5'], S.decreasing(20, 5, K)),
    (['--iters', '9,8,7,6,5,4,3,2,1,1'], S.explicit([9, 8, 7, 6, 5, 4, 3, 2, 1, 1], K)),
    (['--tau', '0.01', '--tau_cap', '7'], S.adaptive(0.01, 7, K)),
    (['--tau', '0.02', '--stop_mode', 'abs', '--iter_left', '12'], S.adaptive(0.02, 12, K, stop_mode='abs')),
    (['--tau', '0.03'], S.adaptive(0.03, S.DEFAULT_CAP, K)),   # one default cap everywhere: 20
])
def test_schedule_flags_map_to_iter_schedule(argv, want):
    got = sample_config(argv).schedule(K)
    assert got == want


def test_bad_schedule_flags_exit_with_a_message():
    with pytest.raises(SamplingError, match='--iters needs 10 counts'):
        sample_config(['--iters', '3,2']).schedule(K)


@pytest.mark.parametrize('argv,message', [
    (['--cfg', '-1'], '--cfg must be >= 0'),
    (['--top_k', '-3'], '--top_k must be >= 0'),
    (['--top_p', '1.5'], '--top_p must be in [0, 1]'),
    (['--iter_left', '-1'], '--iter_left/--iter_right must be >= 0'),
    (['--tau', '0.1', '--tau_json', 'x.json'], 'either --tau or --tau_json'),
    (['--tau_cap', '5'], '--tau_cap only applies to adaptive schedules'),
    (['--stop_mode', 'abs'], '--stop_mode only applies to adaptive schedules'),
    (['--compile_scope', 'scale'], '--compile_scope only applies with --compile'),
])
def test_out_of_range_and_conflicting_sampling_values_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        sample_config(argv)
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('argv,message', [(['--tau', '0'], 'tau must be > 0'), (['--tau', '-0.5'], 'tau must be > 0'),
                                          (['--tau', 'abc'], 'comma-separated numbers')])
def test_bad_tau_values_are_clear_errors(argv, message):
    with pytest.raises(SamplingError, match=message):
        sample_config(argv).schedule(4)


@pytest.mark.parametrize('argv,fill', [([], True), (['--official_kv'], False), (['--official_kv', 'False'], True)])
def test_official_kv_sets_fill_forward(argv, fill):
    assert sample_config(argv).call_kwargs(K)['fill_forward'] is fill


def test_autocast_auto_is_fp32_on_cpu_and_bf16_autocasts():
    x = torch.ones(2, 2)
    with autocast_for('cpu', 'auto'):
        assert (x @ x).dtype == torch.float32
    with autocast_for('cpu', 'bf16'):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(SamplingError, match='--dtype'):
        SampleConfig(dtype='fp8').validate()


def test_class_labels_are_ids_or_the_names_an_export_records():
    names = ['circle', 'square', '7']
    assert class_ids(['square', '0', 'circle'], names, 3) == [1, 0, 0]
    assert class_ids(['7'], names, 3) == [2]   # a folder named like a number is that folder
    assert class_ids(['2'], None, 3) == [2]
    with pytest.raises(SystemExit, match=r"'triangle' is not a class of this model \(3 classes\); its classes are "
                                         r"named circle, square, 7"):
        class_ids(['triangle'], names, 3)
    with pytest.raises(SystemExit, match='records no class names: pass ids'):
        class_ids(['circle'], None, 3)
    with pytest.raises(SystemExit, match='out of range'):
        class_ids(['5'], names, 3)


def test_grid_rows_are_labelled_with_the_class_names(tmp_path):
    """With the class names an export records, a white margin on the left names each row; without them the grid
    is as before."""
    imgs = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain, labelled = str(tmp_path / 'plain.png'), str(tmp_path / 'labelled.png')
    gen_img.write_images(imgs, [(0, 0), (0, 1), (1, 0), (1, 1)], [0, 1], [0, 1], str(tmp_path), 'a_', True, 4)
    gen_img.write_images(imgs, [(0, 0), (0, 1), (1, 0), (1, 1)], [0, 1], [0, 1], str(tmp_path), 'b_', True, 4,
                         ['circle', 'square'])
    a = read_png(tmp_path / 'a_classes0_1_seeds0_1_grid.png')
    b = read_png(tmp_path / 'b_classes0_1_seeds0_1_grid.png')
    margin = b.shape[1] - a.shape[1]
    assert b.shape[0] == a.shape[0] and margin > 20
    assert np.array_equal(b[:, margin:], a)   # the images unchanged, to the right of the labels
    row_h = (a.shape[0] - 2) // 2
    for r in range(2):   # each row's label is drawn (dark pixels) within that row's band of the margin
        band = b[2 + r * row_h:2 + (r + 1) * row_h - 2, :margin]
        assert (band < 128).any(), r
    assert (b[:, :margin] > 128).mean() > 0.8   # mostly white


def _gen(tmp_path, *argv):
    return gen_img.main(['--device', 'cpu', '--output_dir', str(tmp_path), '--top_k', '0', '--top_p', '0',
                         '--progress', 'False', *map(str, argv)])


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """Tiny VIAR and VAR slim exports that embed their tokenizer."""
    root = tmp_path_factory.mktemp('exports')
    out = {}
    for kind, implicit in (('viar', True), ('var', False)):
        out[kind] = write_tiny_export(root / f'{kind}.pth', implicit)
    return out


def test_banner_says_what_this_run_does(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['viar'], '--class_label', 1, 3, '--seeds', 0, '--iter_left', 4,
         '--iter_right', 1)
    banner = next(l for l in capsys.readouterr().out.splitlines() if 'classes x' in l)
    assert '2 classes x 1 seed = 2 images' in banner                  # asked for, not the model's 5
    assert 'Dec.(4,1): 4,3,2,1 iterations per scale' in banner        # the schedule and its counts


def test_kv_line_says_which_rows_it_counts_and_cfg_0_holds_half(exports, tmp_path, capsys):
    """With guidance the KV caches hold the conditional and unconditional rows; at cfg 0 only the conditional
    ones, half the bytes, and the report line says which."""
    kv = {}
    for cfg in (1.5, 0):
        _gen(tmp_path / str(cfg), '--var_ckpt', exports['viar'], '--class_label', 1, '--seeds', 0, 1, '--cfg', cfg)
        line = next(ln for ln in capsys.readouterr().out.splitlines() if 'KV cache:' in ln)
        kv[cfg] = float(line.split('KV cache: ')[1].split(' MiB')[0])
        assert ('cond + uncond rows' in line) == (cfg != 0) and ('conditional rows only' in line) == (cfg == 0)
    assert kv[0] == pytest.approx(kv[1.5] / 2, abs=0.01)


def test_a_scale_with_zero_iterations_is_said_to_skip_the_implicit_block(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['viar'], '--class_label', 0, '--seeds', 0, '--iter_left', 0,
         '--iter_right', 3)
    out = capsys.readouterr().out
    assert 'Inc.(0,3): 0,1,2,3 iterations per scale; scale 1 skips the implicit block' in out


def test_schedule_flags_on_a_var_checkpoint_warn_and_the_banner_says_var(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['var'], '--use_implicit', 'True', '--iter_left', 4, '--iter_right', 4,
         '--class_label', 0, '--seeds', 0)
    out = capsys.readouterr().out
    assert '--use_implicit True (file: False)' in out                 # the file wins, the flag is named
    assert '--iter_left, --iter_right ignored' in out and 'no implicit block' in out
    banner = next(l for l in out.splitlines() if 'classes x' in l or 'class x' in l)
    assert banner.startswith('[gen_img] VAR depth 4') and 'Con.(4,4)' not in banner
