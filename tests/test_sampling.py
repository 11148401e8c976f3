"""sampling.py: the global batches, rank-independent images, the .npz layout, resume after a kill, official seeds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import needs_c_compiler
from tests.proc_util import run_group
from sampling import make_batches, png_name, rank_share, run_name_head, sample_folder_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_CASES = [(3, 3, 2), (4, 50, 25), (2, 5, 7), (1, 1, 1), (5, 4, 3)]


# ---------------------------------------------------------------- the global batches (pure)

@pytest.mark.parametrize('world', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('num_classes,per_class,batch_size', SIZE_CASES)
def test_batches_cover_every_index_once(world, num_classes, per_class, batch_size):
    batches = make_batches(num_classes, per_class, batch_size, seed=1)
    shares = [rank_share(batches, r, world) for r in range(world)]
    got = [i for share in shares for b in share for i in b.indices]
    assert sorted(got) == list(range(num_classes * per_class))
    assert len(got) == len(set(got))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1          # round-robin: balanced
    for b in batches:
        assert 1 <= b.size <= batch_size
        assert {i // per_class for i in b.indices} == {b.label}         # a batch never mixes classes
    assert [b.order for b in batches] == list(range(len(batches)))


def test_batch_seeds_distinct_and_stable():
    batches = make_batches(4, 6, 2, seed=7)
    assert len({b.seed for b in batches}) == len(batches)
    # a class's batches do not depend on how many classes are sampled
    small = make_batches(2, 6, 2, seed=7)
    assert [(b.label, b.seed, b.start) for b in small] == [(b.label, b.seed, b.start) for b in batches[:len(small)]]
    assert {b.seed for b in make_batches(4, 6, 2, seed=8)}.isdisjoint({b.seed for b in batches})


def test_official_seed_rule():
    batches = make_batches(1000, 50, 25, seed=1, official_seeds=True)
    assert len(batches) == 2000
    assert {b.seed for b in batches} == {1, 2}                               # official: seed + i for every class
    assert all(b.seed == 1 + b.chunk for b in batches)
    assert [(b.label, b.start, b.size) for b in batches[2:4]] == [(1, 50, 25), (1, 75, 25)]


def test_batches_reject_bad_sizes():
    for bad in [(0, 3, 2, 1), (3, 0, 2, 1), (3, 3, 0, 1), (3, 3, 2, -1)]:
        with pytest.raises(ValueError):
            make_batches(*bad)


def test_official_folder_name():
    from tests.tiny import tiny_vae_var
    _, viar = tiny_vae_var(True, depth=30, width=60, heads=2)
    _, var = tiny_vae_var(False, depth=16, width=32, heads=2)
    head = lambda m: run_name_head(m.kind, m.depth)   # noqa: E731
    assert sample_folder_name(head(viar), 'ckpts/viar.pth', 1.5, 1) == 'implicit-viar.pth-cfg-1.5-seed-1'
    assert sample_folder_name(head(var), '/x/var_d16.pth', 2, 3) == 'd16-var_d16.pth-cfg-2.0-seed-3'
    assert png_name(123) == '000123.png'


# ---------------------------------------------------------------- the script on a tiny model (CPU)

NUM_CLASSES, PER_CLASS, BATCH, ITERS = 3, 3, 2, (3, 2)
FOLDER = 'implicit-tiny.pth-cfg-1.5-seed-1'


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    """A tiny VIAR slim export (5 classes, 8 px images) that embeds its tokenizer."""
    from tests.tiny import tiny_vae_var
    from utils.checkpoint import save_atomic
    from models.config import ModelSpec
    from utils.model_io import slim_export
    vae, var = tiny_vae_var(True)
    spec = ModelSpec(depth=4, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                     patch_nums=(1, 2, 3, 4), V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1,
                     num_classes=5)
    path = str(tmp_path_factory.mktemp('ckpt') / 'tiny.pth')
    save_atomic(slim_export(var, spec, vae=vae), path)
    return path


def cli(ckpt: str, sample_dir, *extra) -> list:
    """sampling.py flags for the tiny run: 3 classes x 3 images, batches of 2, Dec.(3,2) iterations."""
    return ['--ckpt_path', ckpt, '--vae_ckpt', '', '--num_classes', str(NUM_CLASSES), '--per_class', str(PER_CLASS),
            '--batch_size', str(BATCH), '--iter_left', str(ITERS[0]), '--iter_right', str(ITERS[1]),
            '--device', 'cpu', '--dtype', 'fp32', '--progress', 'False', '--sample_dir', str(sample_dir), *extra]


def run_main(args: list):
    import sampling
    return sampling.main(args)


def run_subprocess(args: list, timeout: float = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else []
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return run_group([sys.executable, *launcher, 'sampling.py', *args], timeout, cwd=ROOT, env=env)


def load_npz(sample_dir) -> np.ndarray:
    with np.load(os.path.join(str(sample_dir), FOLDER + '.npz')) as f:
        return f['arr_0']


def direct_images(ckpt: str, official_seeds: bool = False) -> np.ndarray:
    """Every batch sampled by calling the model directly with the batch's label and seed, in index order."""
    from utils.model_io import load_models
    _, var, _ = load_models(ckpt, '')
    out = np.zeros((NUM_CLASSES * PER_CLASS, 8, 8, 3), np.uint8)
    for b in make_batches(NUM_CLASSES, PER_CLASS, BATCH, seed=1, official_seeds=official_seeds):
        with torch.inference_mode():
            img = var.autoregressive_infer_cfg(b.size, torch.full((b.size,), b.label), g_seed=b.seed, cfg=1.5,
                                               top_k=900, top_p=0.96, iter_left=ITERS[0], iter_right=ITERS[1])
        out[b.start:b.start + b.size] = (img.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return out


@pytest.fixture(scope='module')
def reference(tiny_ckpt, tmp_path_factory):
    """One single-process run: (sample_dir, arr_0)."""
    out = tmp_path_factory.mktemp('ref')
    npz = run_main(cli(tiny_ckpt, out))
    assert npz == os.path.join(str(out), FOLDER + '.npz')
    return out, load_npz(out)


def test_npz_is_index_ordered_and_matches_direct_calls(tiny_ckpt, reference):
    out, arr = reference
    assert arr.dtype == np.uint8 and arr.shape == (NUM_CLASSES * PER_CLASS, 8, 8, 3)
    assert arr.std() > 0
    np.testing.assert_array_equal(arr, direct_images(tiny_ckpt))
    from PIL import Image
    for i in range(len(arr)):   # the PNGs are the npz rows
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(str(out), FOLDER, png_name(i)))), arr[i])


def test_json_report(reference):
    out, _ = reference
    with open(os.path.join(str(out), FOLDER + '.json')) as f:
        report = json.load(f)
    # --iter_left 3 --iter_right 2 over 4 scales: linspace 3, 2.67, 2.33, 2 truncated to 3, 2, 2, 2 iterations.
    # 3 classes x 3 images in batches of 2 that never mix classes: 2 + 1 per class, 6 batches, 9 images;
    # summed over the batches, 6 x (3, 2, 2, 2) iterations
    assert report['iters_per_scale_planned'] == [3, 2, 2, 2]
    assert report['iters_per_scale'] == [3, 2, 2, 2]       # a fixed schedule runs exactly its counts
    assert report['images'] == 9 == report['images_sampled_this_run']
    [rank0] = report['per_rank']
    assert rank0['images'] == 9 and rank0['batches'] == 6 and rank0['iters_sum'] == [18, 12, 12, 12]
    assert report['images_per_s'] > 0 and report['peak_memory_bytes'] > 0
    assert report['peak_memory_kind'] == 'cpu_peak_rss'
    assert report['settings']['batch_size'] == BATCH and report['model']['use_implicit'] is True
    assert not [n for n in os.listdir(os.path.join(str(out), FOLDER)) if n.endswith('.tmp')]


@pytest.mark.slow
@needs_c_compiler
def test_compile_flag_resumes_an_eager_folder(tiny_ckpt, reference, tmp_path):
    """--compile is not part of the resume settings: it finishes an eager run's folder with the same images."""
    out = tmp_path / 'mixed'
    run_main(cli(tiny_ckpt, out, '--stop_after', '2'))   # eager: 2 of 5 batches
    run_main(cli(tiny_ckpt, out, '--compile'))
    with open(os.path.join(str(out), FOLDER + '.json')) as f:
        assert json.load(f)['config']['compile'] is True
    diff = np.abs(load_npz(out).astype(int) - reference[1].astype(int))
    assert diff.max() <= 1, f'compiled batches differ from eager ones by {diff.max()} levels'


def test_rerun_of_a_finished_folder_repacks_and_keeps_figures(tiny_ckpt, reference, tmp_path):
    import shutil
    out = tmp_path / 'copy'
    shutil.copytree(str(reference[0]), str(out))
    os.remove(os.path.join(str(out), FOLDER + '.npz'))
    run_main(cli(tiny_ckpt, out))
    np.testing.assert_array_equal(load_npz(out), reference[1])
    with open(os.path.join(str(out), FOLDER + '.json')) as f:
        report = json.load(f)
    assert report['images_sampled_this_run'] == 0 and report['figures_from_earlier_run'] is True
    assert report['images_per_s'] > 0 and report['iters_per_scale'] == np.linspace(*ITERS, 4, dtype=int).tolist()


@pytest.mark.slow
def test_two_ranks_give_the_same_images(tiny_ckpt, reference, tmp_path):
    proc = run_subprocess(cli(tiny_ckpt, tmp_path), torchrun=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    np.testing.assert_array_equal(load_npz(tmp_path), reference[1])
    with open(os.path.join(str(tmp_path), FOLDER + '.json')) as f:
        report = json.load(f)
    assert report['world_size'] == 2 and [r['images'] for r in report['per_rank']] == [6, 3]


def test_resume_skips_finished_and_remakes_truncated(tiny_ckpt, reference, tmp_path):
    run_main(cli(tiny_ckpt, tmp_path, '--stop_after', '2'))   # batches 0 and 1: images 0, 1 | 2
    folder = os.path.join(str(tmp_path), FOLDER)
    assert sorted(n for n in os.listdir(folder) if n.endswith('.png')) == [png_name(i) for i in range(3)]
    assert not os.path.exists(folder + '.npz')
    with open(os.path.join(folder, png_name(1)), 'rb') as f:
        data = f.read()
    with open(os.path.join(folder, png_name(1)), 'wb') as f:   # a half-written file under the final name
        f.write(data[:len(data) // 2])
    with open(os.path.join(folder, '.000004.png.999.tmp'), 'wb') as f:   # debris of a killed write
        f.write(b'junk')
    kept = {i: os.stat(os.path.join(folder, png_name(i))).st_mtime_ns for i in (0, 2)}
    time.sleep(0.05)
    run_main(cli(tiny_ckpt, tmp_path))
    np.testing.assert_array_equal(load_npz(tmp_path), reference[1])
    assert {i: os.stat(os.path.join(folder, png_name(i))).st_mtime_ns for i in (0, 2)} == kept   # not redone
    assert not [n for n in os.listdir(folder) if n.endswith('.tmp')]
    with open(os.path.join(str(tmp_path), FOLDER + '.json')) as f:
        assert json.load(f)['images_sampled_this_run'] == NUM_CLASSES * PER_CLASS - 2


@pytest.mark.slow
def test_resume_after_sigkill(tiny_ckpt, reference, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, 'sampling.py', *cli(tiny_ckpt, tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = os.path.join(str(tmp_path), FOLDER)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(folder) and any(n.endswith('.png') for n in os.listdir(folder)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_main(cli(tiny_ckpt, tmp_path))
    np.testing.assert_array_equal(load_npz(tmp_path), reference[1])


def test_corrupt_png_is_removed_then_remade(tiny_ckpt, reference, tmp_path):
    run_main(cli(tiny_ckpt, tmp_path))
    path = os.path.join(str(tmp_path), FOLDER, png_name(4))
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    data[8:-12] = bytes(len(data) - 20)   # complete-looking (signature and IEND) but unreadable
    with open(path, 'wb') as f:
        f.write(bytes(data))
    with pytest.raises(SystemExit, match='corrupt'):
        run_main(cli(tiny_ckpt, tmp_path))
    assert not os.path.exists(path)
    run_main(cli(tiny_ckpt, tmp_path))
    np.testing.assert_array_equal(load_npz(tmp_path), reference[1])


def test_official_seeds_and_no_mixing(tiny_ckpt, reference, tmp_path):
    run_main(cli(tiny_ckpt, tmp_path, '--official_seeds'))
    arr = load_npz(tmp_path)
    np.testing.assert_array_equal(arr, direct_images(tiny_ckpt, official_seeds=True))
    assert not np.array_equal(arr, reference[1])
    with pytest.raises(SystemExit, match='official_seeds'):   # same folder name, other seeds: refused
        run_main(cli(tiny_ckpt, tmp_path, '--official_seeds', 'False'))


def test_flags_parse_as_typed():
    import sampling
    from utils.sample.config import parse as parse_all

    def spec(argv):
        return parse_all(sampling.build_parser(), argv)[1].spec()
    parse = sampling.build_parser().parse_args
    assert spec(['--use_implicit']).use_implicit is True
    assert spec(['--use_implicit', 'False']).use_implicit is False
    assert parse(['--use_implicit', 'True', '--official_seeds', '--ema', 'no']).official_seeds is True
    args = parse([])
    assert (args.cfg, args.top_k, args.top_p, args.seed, args.per_class) == (1.5, 900, 0.96, 1, 50)
    assert spec([]).depth == 30   # the official var_d30.pth when no checkpoint is named
    assert parse(['--ckpt_path', 'x.pth', '--num_classes', '10']).var_ckpt == 'x.pth'
    with pytest.raises(SystemExit):
        parse(['--use_implicit', 'maybe'])


def test_rerun_with_other_settings_names_each_setting_with_old_and_new_values(tiny_ckpt, reference, tmp_path):
    out = tmp_path / 'rerun'
    run_main(cli(tiny_ckpt, out, '--stop_after', '1'))
    with pytest.raises(SystemExit) as e:
        run_main(cli(tiny_ckpt, out, '--top_k', '10', '--iter_left', '4'))
    msg = str(e.value)
    assert 'top_k: 900 -> 10' in msg and 'counts: [3, 2, 2, 2] -> [4, 3, 2, 2]' in msg and '\n' not in msg


def test_bad_sizes_are_a_clear_error(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match='5 classes'):
        run_main(cli(tiny_ckpt, tmp_path, '--num_classes', '6'))
    with pytest.raises(SystemExit, match='batch_size'):
        run_main(cli(tiny_ckpt, tmp_path, '--batch_size', '0'))


def test_explicit_var_folder_and_report(tmp_path):
    from tests.tiny import tiny_vae_var
    from utils.checkpoint import save_atomic
    from models.config import ModelSpec
    from utils.model_io import slim_export
    vae, var = tiny_vae_var(False, depth=2)
    spec = ModelSpec(depth=2, use_implicit=False, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3, 4), V=48, Cvae=8,
                     vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1, num_classes=5)
    ckpt = str(tmp_path / 'var_tiny.pth')
    save_atomic(slim_export(var, spec, vae=vae), ckpt)
    npz = run_main(cli(ckpt, tmp_path / 'out', '--num_classes', '2', '--per_class', '2', '--cfg', '2'))
    assert os.path.basename(npz) == 'd2-var_tiny.pth-cfg-2.0-seed-1.npz'
    with np.load(npz) as f:
        assert f['arr_0'].shape == (4, 8, 8, 3)
    with open(npz[:-4] + '.json') as f:
        report = json.load(f)
    assert report['iters_per_scale'] is None and report['model']['use_implicit'] is False
