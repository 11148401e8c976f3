"""Pre-tokenised training: scripts/extract_tokens.py shards, train.py --token_cache, and their bad inputs.

The central checks: the cached tokens equal the on-the-fly tokenisation of the same centre crop at the same
batch size, and training from the cache gives the same losses as training from the images.
"""
import json
import os

import numpy as np
import pytest
import torch

import train
from models.layout import num_tokens
from models.vqvae import VQVAE
from tests.train_helpers import make_image_folder, read_steps, tiny_flags
from utils.checkpoint import save_atomic
from utils.data import token_cache as tc

PN = (1, 2, 3, 4)
L = num_tokens(PN)


def extract(*argv):
    import importlib
    mod = importlib.import_module('scripts.extract_tokens')
    return mod.main([str(a) for a in argv])


def tokenizer_file(path: str, seed: int = 0) -> str:
    """A random tokenizer of tiny_flags' sizes (16 px images, 4x4 latent, V 32), saved as a bare state dict."""
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PN,
                ch_mult=(1, 2, 4), num_res_blocks=1)
    save_atomic(vae.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(data folder, tokenizer file, cache at mid_reso 1.125, cache at mid_reso 1.0 for the training comparison)."""
    root = tmp_path_factory.mktemp('tc')
    data = make_image_folder(str(root / 'imgs'), classes=2, per_class=8, val_per_class=2, size=20)
    vae = tokenizer_file(str(root / 'vae.pth'))
    common = ['--data_path', data, '--vae_ckpt', vae, '--pn', '1_2_3_4', '--batch_size', 4, '--shard_size', 8,
              '--device', 'cpu', '--progress', 'False']
    crop = str(root / 'cache_crop')
    extract(*common, '--out', crop, '--mid_reso', 1.125)
    full = str(root / 'cache_full')
    extract(*common, '--out', full, '--mid_reso', 1.0)
    return data, vae, crop, full


# ---------------------------------------------------------------- pure pieces

def test_view_draw_is_a_function_of_seed_epoch_and_index():
    draws = {(e, i): tc.draw_view(7, e, i, 4) for e in range(6) for i in range(50)}
    assert draws == {(e, i): tc.draw_view(7, e, i, 4) for e in range(6) for i in range(50)}   # no hidden state
    assert set(draws.values()) == {0, 1, 2, 3}
    assert any(draws[(0, i)] != draws[(1, i)] for i in range(50))       # images change view between epochs
    assert any(tc.draw_view(8, 0, i, 4) != draws[(0, i)] for i in range(50))   # and with the seed
    assert tc.draw_view(7, 3, 5, 1) == 0


def test_views_layout_and_shards():
    assert tc.views_per_image(3, True) == 6 and tc.views_per_image(3, False) == 3
    assert [tc.view_parts(v, True) for v in range(4)] == [(0, False), (0, True), (1, False), (1, True)]
    assert [tc.view_parts(v, False) for v in range(2)] == [(0, False), (1, False)]
    assert tc.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    tok = torch.arange(2 * L).view(2, L)
    parts = tc.split_scales(tok, PN)
    assert [p.shape[1] for p in parts] == [1, 4, 9, 16] and torch.equal(torch.cat(parts, 1), tok)
    assert len(tc.split_scales(tok, PN, prog_si=1)) == 2


def test_cache_sampler_keeps_the_image_order_at_any_world_size():
    """Same global batches as the image sampler; items carry the epoch; two ranks together = one rank."""
    from utils.data.sampler import DistInfiniteBatchSampler, epoch_permutation
    img = DistInfiniteBatchSampler(10, 4, seed=3)
    one = tc.CacheBatchSampler(10, 4, seed=3)
    two = [tc.CacheBatchSampler(10, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    it_img, it_one, it_two = iter(img), iter(one), [iter(s) for s in two]
    for step in range(9):   # three epochs
        a, b = next(it_img), next(it_one)
        assert [i for i, _ in a] == [i for i, _ in b] and {e for _, e in b} == {step // 3}
        assert next(it_two[0]) + next(it_two[1]) == b
    resumed = tc.CacheBatchSampler(10, 4, seed=3)
    resumed.load_state_dict(resumed.position_at(4))
    assert next(iter(resumed)) == [(i, 1) for i, _ in img.local_batch(1, 1, epoch_permutation(3, 1, 10))]


# ---------------------------------------------------------------- the cache equals on-the-fly tokens

def tiny_vae(vae_path: str) -> VQVAE:
    """The tokenizer of `tokenizer_file`, loaded back."""
    from utils.checkpoint import load_vae_weights
    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=PN,
                ch_mult=(1, 2, 4), num_res_blocks=1)
    load_vae_weights(vae, vae_path)
    return vae.eval()


def resized(path: str, side: int = 18):
    """A (square) image of the test folder resized to side x side as the extractor does (LANCZOS)."""
    import PIL.Image as PImage
    img = PImage.open(path).convert('RGB')
    assert img.size[0] == img.size[1]
    return img.resize((side, side), PImage.LANCZOS)


def crop_tensor(img, left: int, top: int, mirrored: bool) -> torch.Tensor:
    """(3, 16, 16) in [-1, 1] of the 16 px crop at (left, top), mirrored left-right by PIL when asked."""
    import PIL.Image as PImage
    crop = img.crop((left, top, left + 16, top + 16))
    if mirrored:
        crop = crop.transpose(PImage.FLIP_LEFT_RIGHT)
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


def encode(vae, imgs_B3HW: torch.Tensor) -> torch.Tensor:
    """(B, L) token indices of a batch, scales concatenated (as the cache stores them)."""
    with torch.no_grad():
        return torch.cat(vae.img_to_idxBl(imgs_B3HW), dim=1)


def test_cached_tokens_equal_on_the_fly_centre_crop_at_the_same_batch_size(setup):
    data, vae_path, crop, _ = setup
    from utils.data.datasets import build_datasets, build_transforms
    man = tc.open_cache(crop)
    assert man['settings']['resolution'] == 16 and man['settings']['mid_reso_px'] == 18
    assert man['splits']['train']['images'] == 16 and len(man['splits']['train']['shards']) == 2
    vae = tiny_vae(vae_path)
    _, train_set, val_set = build_datasets(data, 16, 18)
    _, centre = build_transforms(16, 18, hflip=False)
    for split, samples in (('train', train_set.base.samples), ('val', val_set.samples)):
        ds = tc.TokenShards(crop, man, split)
        with torch.no_grad():
            for b in range(0, len(samples), 4):   # the extractor's batches (4 images, inside one shard of 8)
                imgs = torch.stack([centre(train_set.base.loader(p)) for p, _ in samples[b:b + 4]])
                want = torch.cat(vae.img_to_idxBl(imgs), dim=1)
                got = torch.stack([ds[i][0] for i in range(b, min(b + 4, len(samples)))])
                assert torch.equal(got, want), f'{split} batch {b // 4}'
                assert [ds[i][1] for i in range(b, min(b + 4, len(samples)))] == [c for _, c in samples[b:b + 4]]
    assert len(torch.unique(want)) > 3   # a tokenizer that maps everything to one code would prove nothing


@pytest.mark.parametrize('implicit', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_training_from_the_cache_gives_the_image_training_losses(setup, tmp_path, implicit):
    """mid_reso 1.0 and no flip: the image run's random crop is the whole image, the cache's centre crop too."""
    data, vae, _, full = setup
    extra = ('--mid_reso=1.0', '--max_steps=3', f'--vae_ckpt={vae}', '--val_every=3')
    train.main(tiny_flags(data, str(tmp_path / 'img'), implicit, *extra))
    # the cache is all a cached run reads, its tokenizer too: no --data_path, no --vae_ckpt
    cached = [f for f in tiny_flags(data, str(tmp_path / 'tok'), implicit, *extra[:2], *extra[3:],
                                    f'--token_cache={full}') if not f.startswith(('--data_path', '--vae_ckpt'))]
    train.main(cached)
    a = read_steps(str(tmp_path / 'img' / 'steps-rank0.jsonl'))
    b = read_steps(str(tmp_path / 'tok' / 'steps-rank0.jsonl'))
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a[1]['loss'] == b[1]['loss']   # the first step: same tokens, same model, same draws
    assert [a[s]['loss'] for s in a] == [b[s]['loss'] for s in b]
    val = [[ln for ln in open(tmp_path / d / 'log.txt') if '[val]' in ln][-1].split(': ', 1)[1] for d in ('img', 'tok')]
    assert val[0].split('Lm')[1] == val[1].split('Lm')[1]   # validation (centre crops) equal too


def test_hflip_views_hold_the_tokens_of_the_left_right_mirrored_crop(setup, tmp_path):
    """--hflip: view 1 of every training image is the tokenizer's output on its centre crop mirrored left to right."""
    data, vae_path, _, _ = setup
    out = str(tmp_path / 'c')
    extract('--data_path', data, '--vae_ckpt', vae_path, '--pn', '1_2_3_4', '--out', out, '--hflip', '--batch_size', 4,
            '--shard_size', 8, '--device', 'cpu', '--progress', 'False')
    man = tc.open_cache(out)
    assert man['splits']['train']['views'] == 2
    from utils.data.datasets import build_datasets
    _, train_set, _ = build_datasets(data, 16, 18)
    samples = train_set.base.samples
    vae = tiny_vae(vae_path)
    stored = torch.from_numpy(np.concatenate([np.load(os.path.join(out, f'train-0000{k}.tokens.npy'))
                                              for k in range(2)]).astype(np.int64))   # (16 images, 2 views, L)
    for b in range(0, 16, 4):   # the extractor's batches
        imgs = [resized(p) for p, _ in samples[b:b + 4]]
        plain = encode(vae, torch.stack([crop_tensor(im, 1, 1, False) for im in imgs]))       # 18 px: centre at 1
        mirrored = encode(vae, torch.stack([crop_tensor(im, 1, 1, True) for im in imgs]))
        upside_down = encode(vae, torch.stack([crop_tensor(im, 1, 1, False).flip(-2) for im in imgs]))
        assert torch.equal(stored[b:b + 4, 0], plain), f'batch {b // 4}: view 0 is not the centre crop'
        assert torch.equal(stored[b:b + 4, 1], mirrored), f'batch {b // 4}: view 1 is not the left-right mirror'
        assert not torch.equal(mirrored, upside_down) and not torch.equal(mirrored, plain)   # the check can tell


def test_views_are_drawn_per_epoch_from_stored_crops_and_flips(setup, tmp_path):
    """Each stored view is the tokenizer's output on one 16 px crop of the 18 px image (view 2c) or on that same crop
    mirrored (view 2c + 1); the two crops differ; training draws one of these views per (seed, epoch, image)."""
    data, vae_path, _, _ = setup
    out = str(tmp_path / 'c')
    extract('--data_path', data, '--vae_ckpt', vae_path, '--pn', '1_2_3_4', '--out', out, '--crops', 2, '--hflip',
            '--seed', 5, '--device', 'cpu', '--progress', 'False', '--batch_size', 8)
    man = tc.open_cache(out)
    assert man['splits']['train']['views'] == 4 and man['splits']['val']['views'] == 1
    tok = np.load(os.path.join(out, 'train-00000.tokens.npy'))
    assert tok.dtype == np.uint16 and tok.shape == (16, 4, L)
    stored = torch.from_numpy(tok.astype(np.int64))
    from utils.data.datasets import build_datasets
    _, train_set, _ = build_datasets(data, 16, 18)
    samples = train_set.base.samples
    vae = tiny_vae(vae_path)
    offsets = [(left, top) for top in range(3) for left in range(3)]   # every 16 px crop of an 18 px image
    imgs = [resized(p) for p, _ in samples[:8]]                       # the extractor's first batch
    plain = {o: encode(vae, torch.stack([crop_tensor(im, *o, False) for im in imgs])) for o in offsets}
    crop_of = {(i, c): {o for o in offsets if torch.equal(stored[i, 2 * c], plain[o][i])}   # offsets whose tokens
               for i in range(8) for c in range(2)}                                          # match view 2c
    assert all(crop_of.values()), 'some view 2c is no unmirrored crop of its image'
    mirrored = {o: encode(vae, torch.stack([crop_tensor(im, *o, True) for im in imgs]))
                for o in set().union(*crop_of.values())}
    for (i, c), found in crop_of.items():
        assert any(torch.equal(stored[i, 2 * c + 1], mirrored[o][i]) for o in found), \
            f'image {i} view {2 * c + 1} is not view {2 * c} mirrored left-right'
    assert any(crop_of[i, 0].isdisjoint(crop_of[i, 1]) for i in range(8))   # two random crops, not one twice
    ds = tc.TokenShards(out, man, 'train', seed=11)
    drawn = set()
    for i in range(16):
        for epoch in range(3):
            v = tc.draw_view(11, epoch, i, 4)
            assert torch.equal(ds[(i, epoch)][0], stored[i, v])
            drawn.add(v)
    assert drawn == {0, 1, 2, 3}


# ---------------------------------------------------------------- resumable extraction and bad input

def test_extraction_resumes_after_a_kill_keeping_finished_shards(setup, tmp_path):
    data, vae, crop, _ = setup
    import shutil
    out = str(tmp_path / 'c')
    shutil.copytree(crop, out)
    # what a kill leaves: the manifest still 'incomplete', a later shard never written, a temp file
    with open(os.path.join(out, tc.MANIFEST)) as f:
        man = json.load(f)
    man['status'] = 'incomplete'
    man.pop('splits')
    with open(os.path.join(out, tc.MANIFEST), 'w') as f:
        json.dump(man, f)
    os.remove(os.path.join(out, 'train-00001.tokens.npy'))
    open(os.path.join(out, '.train-00001.tokens.npy.abc.tmp'), 'wb').write(b'partial')
    with pytest.raises(SystemExit, match='incomplete.*run the same scripts/extract_tokens.py command again'):
        tc.open_cache(out)
    kept = os.path.getmtime(os.path.join(out, 'train-00000.tokens.npy'))
    extract('--data_path', data, '--vae_ckpt', vae, '--pn', '1_2_3_4', '--batch_size', 4, '--shard_size', 8,
            '--device', 'cpu', '--progress', 'False', '--out', out, '--mid_reso', 1.125)
    assert os.path.getmtime(os.path.join(out, 'train-00000.tokens.npy')) == kept   # not redone
    for name in os.listdir(crop):
        if name.endswith('.npy'):
            assert np.array_equal(np.load(os.path.join(out, name)), np.load(os.path.join(crop, name))), name
    assert tc.open_cache(out)['status'] == 'complete'
    with pytest.raises(SystemExit, match=r'other settings: --crops 1 \(now 3\)'):
        extract('--data_path', data, '--vae_ckpt', vae, '--pn', '1_2_3_4', '--batch_size', 4, '--shard_size', 8,
                '--device', 'cpu', '--progress', 'False', '--out', out, '--mid_reso', 1.125, '--crops', 3)


def _damaged(src: str, dst: str, how: str) -> str:
    import shutil
    shutil.copytree(src, dst)
    shard = os.path.join(dst, 'train-00001.tokens.npy')
    if how == 'missing':
        os.remove(shard)
    elif how == 'truncated':
        with open(shard, 'r+b') as f:
            f.truncate(os.path.getsize(shard) - 10)
    return shard


@pytest.mark.parametrize('how,match', [('missing', 'is missing'), ('truncated', r'is truncated \(\d+ of \d+ bytes\)')])
def test_missing_or_truncated_shard_names_the_file_and_trains_nothing(setup, tmp_path, how, match):
    data, vae, crop, _ = setup
    shard = _damaged(crop, str(tmp_path / 'c'), how)
    out = str(tmp_path / 'out')
    with pytest.raises(SystemExit, match=f'token cache shard {shard} {match}') as e:
        train.main(tiny_flags(data, out, False, '--max_steps=1', f'--vae_ckpt={vae}', f'--token_cache={tmp_path / "c"}'))
    assert '\n' not in str(e.value)
    assert not os.path.exists(os.path.join(out, 'steps-rank0.jsonl'))


@pytest.mark.slow
def test_cache_of_another_tokenizer_or_pyramid_is_refused(setup, tmp_path):
    data, vae, crop, _ = setup
    other = tokenizer_file(str(tmp_path / 'other.pth'), seed=1)
    out = str(tmp_path / 'out')
    flags = tiny_flags(data, out, False, '--max_steps=1', f'--token_cache={crop}')
    with pytest.raises(SystemExit, match='made by another tokenizer .*pass that tokenizer'):
        train.main(flags + [f'--vae_ckpt={other}'])
    with pytest.raises(SystemExit, match='needs the tokenizer that made it .*not --vae_ckpt random'):
        train.main(flags)
    with pytest.raises(SystemExit, match=r'holds the pyramid --pn 1_2_3_4, this run trains --pn 1_2_4'):
        train.main(flags + [f'--vae_ckpt={vae}', '--pn=1_2_4'])
    with pytest.raises(SystemExit, match='is not a folder'):
        train.main(tiny_flags(data, out, False, f'--token_cache={tmp_path / "nope"}', f'--vae_ckpt={vae}'))
    with pytest.raises(SystemExit, match='manifest.json is missing'):
        train.main(tiny_flags(data, out, False, f'--token_cache={tmp_path}', f'--vae_ckpt={vae}'))


def test_extractor_bad_input_is_one_line(setup, tmp_path):
    data, vae, _, _ = setup
    with pytest.raises(SystemExit, match='--vae_ckpt is required'):
        extract('--data_path', data, '--out', tmp_path / 'c')
    with pytest.raises(SystemExit, match='is not a VQVAE tokenizer file'):
        bad = str(tmp_path / 'notvae.pth')
        save_atomic({'class_emb.weight': torch.zeros(3, 4)}, bad)
        extract('--data_path', data, '--out', tmp_path / 'c', '--vae_ckpt', bad, '--device', 'cpu')
    with pytest.raises(SystemExit, match='is not a folder'):
        extract('--data_path', tmp_path / 'none', '--out', tmp_path / 'c', '--vae_ckpt', vae, '--device', 'cpu')
    with pytest.raises(SystemExit, match=r'vae.pth does not fit the model: .*ema_vocab_hit_SV: file \(4, 32\) vs '
                                         r'model \(10, 32\)'):   # a 4-scale tokenizer asked for the 10-scale --pn 256
        extract('--data_path', data, '--out', tmp_path / 'c', '--vae_ckpt', vae, '--device', 'cpu')


@pytest.mark.slow
def test_torchrun_extraction_equals_one_process_and_a_killed_cached_run_resumes_exactly(setup, tmp_path):
    """Two gloo ranks write the same cache as one process; a cached run SIGKILLed after step 5 and restarted
    continues exactly as an uninterrupted one (views drawn per (seed, epoch, image))."""
    import sys
    from tests.train_helpers import ROOT, env_one_thread, run_train
    from tests.proc_util import run_group
    data, vae, crop, _ = setup
    out = str(tmp_path / 'c2')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'scripts', 'extract_tokens.py'), '--data_path', data, '--vae_ckpt', vae, '--pn',
           '1_2_3_4', '--batch_size', '4', '--shard_size', '8', '--device', 'cpu', '--progress', 'False', '--out', out,
           '--mid_reso', '1.125']
    proc = run_group(cmd, 300, cwd=ROOT, env=env_one_thread())
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in os.listdir(crop):
        if name.endswith('.npy'):
            assert np.array_equal(np.load(os.path.join(out, name)), np.load(os.path.join(crop, name))), name
    views = str(tmp_path / 'views')
    extract('--data_path', data, '--vae_ckpt', vae, '--pn', '1_2_3_4', '--out', views, '--crops', 2, '--hflip',
            '--device', 'cpu', '--progress', 'False')
    extra = ('--ep=4', '--save_every_steps=3', f'--vae_ckpt={vae}', f'--token_cache={views}')
    ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
    assert run_train(tiny_flags(data, ref, True, *extra)).returncode == 0
    assert run_train(tiny_flags(data, run, True, *extra, '--kill_at_step=5')).returncode == -9
    assert run_train(tiny_flags(data, run, True, *extra)).returncode == 0
    a, b = read_steps(f'{ref}/steps-rank0.jsonl'), read_steps(f'{run}/steps-rank0.jsonl')
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s]['loss'] == b[s]['loss'] for s in a)
