"""The digits demo: data writing and scoring helpers, and a shortened run of scripts/demo.sh end to end."""
import json
import os
import re
import subprocess
import sys
from typing import List

import numpy as np
import pytest

from tests.tiny import tiny_vae_var
from utils.sample.generate import image_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import demo_progress  # noqa: E402
import demo_quality  # noqa: E402
import demo_score  # noqa: E402
import demo_table  # noqa: E402
import make_digits  # noqa: E402


def test_upscaled_digits_box_average_back_to_their_levels():
    rng = np.random.default_rng(0)
    digits_N88 = rng.integers(0, 17, size=(5, 8, 8)).astype(float)
    for size in (8, 16, 32):
        imgs = make_digits.digits_to_uint8(digits_N88, size)
        assert imgs.shape == (5, size, size, 3) and imgs.dtype == np.uint8
        feats = np.stack([demo_score.to_digit_features(im) for im in imgs])
        assert np.abs(feats - digits_N88.reshape(5, -1)).max() <= 16 / 255 / 2 + 1e-9
    with pytest.raises(ValueError):
        make_digits.digits_to_uint8(digits_N88, 12)


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    tr, va = make_digits.stratified_split(labels, 0.2, seed=3)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(labels)
    assert all((labels[va] == c).sum() == 6 for c in range(10))
    tr2, va2 = make_digits.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, make_digits.stratified_split(labels, 0.2, seed=4)[1])


def test_sample_names_and_per_class_accuracy():
    assert demo_score.parse_sample_name('class3_seed12.png') == (3, 12)
    assert demo_score.parse_sample_name('edit_class3_seed12.png') is None
    assert demo_score.parse_sample_name('class0-9_seeds0-9_grid.png') is None
    assert demo_score.parse_bash_times('8m3.982s 0m19.473s') == pytest.approx(503.455)
    marks = ['digits 0m1.000s 0m0.500s', 'tokenizer 1m1.500s 0m1.000s', 'transformers 4m3.500s 0m4.000s']
    cpu = demo_score.stage_cpu_seconds(marks)
    assert cpu == dict(digits=1.5, tokenizer=61.0, transformers=185.0)
    assert demo_score.quiet_wall_estimate(cpu) == pytest.approx(1.5 + 61.0 + 92.5)   # two processes side by side
    acc = demo_score.per_class_accuracy(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert acc == {0: 1.0, 1: 0.5, 2: 1.0}


# ----------------------------------------------------------------------------- what the console shows
def test_progress_line_counts_steps_and_estimates_the_time_left():
    assert demo_progress.progress_line('VIAR', 120, 500, 150) == 'VIAR: step 120/500 (24%), 2m30s in, ETA 7m55s'
    assert demo_progress.progress_line('VIAR', None, None, 12.4) == 'VIAR: starting, 12s in'
    assert demo_progress.progress_line('VAR', 500, 500, 600) == 'VAR: step 500/500 (100%), 10m00s in, finished'
    assert demo_progress.progress_line('VAR', 0, 500, 5, 'images') == 'VAR: images 0/500 (0%), 5s in'
    assert demo_progress.eta_seconds(0, 10, 5.0) is None and demo_progress.eta_seconds(5, 10, 5.0) == 5.0
    assert [demo_progress.format_duration(s) for s in (0, 59.6, 61, 3725)] == ['0s', '1m00s', '1m01s', '1h02m']


def test_progress_is_read_from_the_last_count_in_a_log():
    train = ('  tblr : 0.0001\n[12-05 20:51:47 train] [ep 1/250 it 1/23] step 1/500 loss 4.8 | ETA 0:00:02\n'
             '[12-05 20:51:48 train] [ep 1/250 it 11/23] step 11/500 loss 4.7\n[val] after step 11 (359 images)\n')
    assert demo_progress.last_progress(train) == (11, 500, 'step')
    assert demo_progress.last_progress('[tokenizer] step 50/300  loss 0.19  usage 48%') == (50, 300, 'step')
    bar = '  0%|          | 0/500 [00:00<?, ?img/s]\r 10%|#         | 50/500 [00:02<00:18, 24.5img/s]'
    assert demo_progress.last_progress(bar) == (50, 500, 'images')
    assert demo_progress.last_progress('[data] train 1438 / val 359 images') is None


@pytest.mark.parametrize('use_implicit', [False, True])
def test_param_count_from_state_dict_matches_the_model(use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    assert demo_score.count_params(var.state_dict()) == sum(p.numel() for p in var.parameters())
    assert demo_score.count_params(vae.state_dict()) == sum(p.numel() for p in vae.parameters())


# ----------------------------------------------------------------------------- quality figures
def _blobs(n_per_class=40, classes=3, dim=6, seed=0):
    """(x, labels): a Gaussian blob per class, well apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    return rng.normal(size=(len(labels), dim)) + 4.0 * labels[:, None], labels


def test_fid_is_zero_for_identical_sets_sees_a_mean_shift_and_ignores_order():
    x, _ = _blobs()
    perm = np.random.default_rng(1).permutation(len(x))
    assert demo_quality.fid(x, x) == pytest.approx(0, abs=1e-8)
    assert demo_quality.fid(x, x[perm]) == pytest.approx(0, abs=1e-8)
    assert demo_quality.fid(x, x + 0.5) == pytest.approx(0.25 * x.shape[1], rel=1e-6)   # |shift|^2, same covariance
    y, _ = _blobs(seed=2)
    assert demo_quality.fid(x, y) == pytest.approx(demo_quality.fid(x, y[perm]), rel=1e-9)


def test_precision_recall_identical_sets_are_one_far_sets_zero_and_order_free():
    x, _ = _blobs()
    assert demo_quality.precision_recall(x, x) == (1.0, 1.0)
    assert demo_quality.precision_recall(x, x + 100.0) == (0.0, 0.0)
    half = x[::2]    # every sample is a reference, so precision is 1
    p, r = demo_quality.precision_recall(x, half)
    assert p == 1.0 and 0 < r <= 1
    perm = np.random.default_rng(1).permutation(len(half))
    assert demo_quality.precision_recall(x, half[perm]) == (p, r)


def test_diversity_is_one_for_the_real_set_zero_for_one_image_per_class_and_scales():
    x, labels = _blobs()
    assert demo_quality.diversity_ratio(x, labels, x, labels) == pytest.approx(1.0)
    firsts = np.stack([x[labels == c][0] for c in labels])      # one repeated image per class
    assert demo_quality.diversity_ratio(firsts, labels, x, labels) == 0.0
    centre = np.stack([x[labels == c].mean(0) for c in labels])
    assert demo_quality.diversity_ratio(centre + 2 * (x - centre), labels, x, labels) == pytest.approx(2.0)
    perm = np.random.default_rng(1).permutation(len(x))
    assert demo_quality.diversity_ratio(x[perm], labels[perm], x, labels) == pytest.approx(1.0)
    assert demo_quality.mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert demo_quality.mean_pairwise_distance(x[:1]) == 0.0


def test_copy_rate_is_one_for_copies_of_training_rows_and_zero_far_away():
    train, _ = _blobs(seed=0)
    val, _ = _blobs(seed=1)
    threshold = demo_quality.copy_threshold(demo_quality.nearest_distance(val, train))
    assert threshold > 0
    copies = train[np.random.default_rng(2).integers(0, len(train), 50)]
    assert demo_quality.copy_rate(demo_quality.nearest_distance(copies, train), threshold) == 1.0
    assert demo_quality.copy_rate(demo_quality.nearest_distance(train + 100.0, train), threshold) == 0.0
    # the threshold is the 5th percentile, and "closer than" is strict
    assert demo_quality.copy_threshold(np.arange(101.0)) == pytest.approx(5.0)
    assert demo_quality.copy_rate(np.array([4.9, 5.0, 5.1, 0.0]), 5.0) == 0.5
    nn_val = demo_quality.nearest_distance(val, train)
    assert demo_quality.copy_rate(nn_val, threshold) == pytest.approx(0.05, abs=1 / len(val))


@pytest.fixture(scope='module')
def digit_judge():
    """A judge fitted on 600 of sklearn's digits (pixel features in 0..1), with 200 held out."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = d.data[:800] / 16.0, d.target[:800]
    return demo_quality.fit_judge(x[:600], y[:600], x[600:], y[600:]), (x[:600], y[:600]), (x[600:], y[600:])


def test_hidden_features_are_the_feature_nets_hidden_layer(digit_judge):
    judge, (x_tr, _), (x_va, _) = digit_judge
    h = demo_quality.hidden_features(judge.net, x_va)
    assert h.shape == (len(x_va), demo_quality.FEATURE_WIDTH) and h.min() >= 0
    logits = h @ judge.net.coefs_[1] + judge.net.intercepts_[1]
    assert np.array_equal(judge.net.classes_[logits.argmax(1)], judge.net.predict(x_va))
    assert judge.feature_net_acc_real > 0.85 and judge.classifier_acc_real > 0.85


def test_judge_scores_the_floors_copies_and_a_collapsed_model(digit_judge):
    judge, (x_tr, y_tr), (x_va, y_va) = digit_judge
    real = demo_quality.score(judge, x_va, y_va)
    assert real['diversity'] == pytest.approx(1.0)
    assert real['copy_rate'] == pytest.approx(0.05, abs=1 / len(x_va))
    assert real['fid'] < 2.0 and real['precision'] > 0.7 and real['recall'] > 0.7
    copies = demo_quality.score(judge, x_tr[:200], y_tr[:200])
    assert copies['copy_rate'] == 1.0 and copies['consistency'] > 0.95
    right = judge.clf.predict(x_tr) == y_tr
    one_each = np.stack([x_tr[right & (y_tr == c)][0] for c in y_va])    # a collapsed model: one image per class
    collapsed = demo_quality.score(judge, one_each, y_va)
    assert collapsed['consistency'] == 1.0                        # what class consistency alone would reward
    assert collapsed['diversity'] == 0.0 and collapsed['recall'] < 0.2 and collapsed['fid'] > 3 * real['fid']
    perm = np.random.default_rng(0).permutation(len(x_va))
    shuffled = demo_quality.score(judge, x_va[perm], y_va[perm])
    assert shuffled == pytest.approx(real)


def test_tokenizer_reconstructions_are_the_pngs_a_memorising_model_would_write():
    import torch
    vae, _ = tiny_vae_var(False)      # 8 px images
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    rec = demo_score.tokenizer_reconstructions(vae, imgs, bs=2)
    assert rec.shape == (5, 64) and 0 <= rec.min() and rec.max() <= 1
    assert np.array_equal(rec, demo_score.tokenizer_reconstructions(vae, imgs, bs=5))   # batches do not matter
    with torch.no_grad():
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = vae.img_to_reconstructed_img(x, last_one=True).add(1).mul(0.5)
    pngs = (direct.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(rec, demo_score.pixel_features(pngs))


RESULTS = dict(vae_steps=300, ar_steps=500, width=96, quick=0, recon_mse=0.031, params_viar=71238, params_var=121644,
               sample=dict(cfg=0, top_k=0, top_p=0, iter_left=4, iter_right=4, seeds_per_class=50),
               fid_real=0.256, precision_real=0.933, recall_real=0.930, classifier_acc_real=0.953,
               fid_recon=0.327, precision_recon=0.953, recall_recon=0.882, class_consistency_recon=0.94,
               fid_viar=0.70, precision_viar=0.80, recall_viar=0.75, class_consistency_viar=0.91,
               fid_var=0.66, precision_var=0.82, recall_var=0.77, class_consistency_var=0.92,
               grid='demo_output/grid.png', seconds=912.0, cpu_seconds=1500.0, load_average_end='1 1 1')


def test_headline_reads_as_a_result_not_a_key_dump():
    text = demo_score.headline(RESULTS, 'demo_output/results.json')
    lines = text.splitlines()
    assert len(lines) <= 14 and 'load_average_end' not in text
    assert any(ln.startswith('trained: tokenizer 300 steps') and '500 steps each' in ln and '71,238' in ln
               for ln in lines)
    rows = {ln.split('  ')[0]: ln.split() for ln in lines if ln.startswith(('real val', 'tokenizer round', 'VIAR ',
                                                                             'VAR '))}
    assert rows['VIAR'][1:] == ['0.70', '0.80', '0.75', '0.91'] and rows['VAR'][1:] == ['0.66', '0.82', '0.77', '0.92']
    assert rows['real val digits (floor)'][-4:] == ['0.26', '0.93', '0.93', '0.95']   # consistency: the classifier
    assert 'FID: lower is better' in text
    assert 'grid: demo_output/grid.png' in text and 'every figure: demo_output/results.json' in text
    assert "Next: explore the demo's models" in text and 'took 15.2 min' in text
    # a scoring of one model's samples (the README walk-through): its row and the floor, nothing it did not compute
    walk = {k: v for k, v in RESULTS.items() if k.endswith(('_real', '_viar')) and k != 'params_viar'}
    text = demo_score.headline(walk, 'scores.json')
    assert 'VIAR' in text and 'VAR ' not in text and 'tokenizer round trip' not in text and 'grid:' not in text
    assert 'trained:' not in text and 'Next:' not in text and 'lower is better' in text


def test_scoring_finds_the_demos_tokenizer_beside_the_data():
    """Without --vae_ckpt, demo_score judges copies among the reconstructions of the demo's tokenizer, as the demo
    does; 'none' asks for raw pixels."""
    assert demo_score.demo_tokenizer('demo_output/digits') == os.path.join('demo_output', 'vae', 'vae.pth')
    assert demo_score.demo_tokenizer('/tmp/d/digits/') == '/tmp/d/vae/vae.pth'
    assert demo_score.resolve_vae_ckpt('', 'demo_output/digits', exists=lambda p: True) == 'demo_output/vae/vae.pth'
    assert demo_score.resolve_vae_ckpt('', 'demo_output/digits', exists=lambda p: False) == ''
    assert demo_score.resolve_vae_ckpt('none', 'demo_output/digits', exists=lambda p: True) == ''
    assert demo_score.resolve_vae_ckpt('my/vae.pth', 'demo_output/digits', exists=lambda p: False) == 'my/vae.pth'


def test_setup_says_what_it_installs_before_pip_starts(tmp_path):
    """scripts/setup.sh names what it installs and its size before pip's quiet minutes, and nothing once installed."""
    import shutil
    (tmp_path / 'scripts').mkdir()
    shutil.copy(os.path.join(ROOT, 'scripts', 'setup.sh'), tmp_path / 'scripts')
    shutil.copy(os.path.join(ROOT, 'requirements.txt'), tmp_path)
    fake = tmp_path / '.venv' / 'bin' / 'python'    # an existing .venv whose python only reports pip's calls
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "PIP $*"\n')
    fake.chmod(0o755)
    n = sum(1 for ln in open(tmp_path / 'requirements.txt') if ln.strip() and not ln.lstrip().startswith('#'))

    def setup(**env):
        proc = subprocess.run(['bash', str(tmp_path / 'scripts' / 'setup.sh')], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    out = setup()
    first_pip = next(i for i, ln in enumerate(out) if ln.startswith('PIP'))
    before = '\n'.join(out[:first_pip])
    assert f'the {n} packages of requirements.txt' in before and 'about 7.3 GB' in before and 'minutes' in before
    assert setup() == [ln for ln in out if not ln.startswith(('setup: pip', 'setup: about', 'PIP'))]   # installed
    (tmp_path / '.venv' / '.requirements.sha256').unlink()
    assert 'about 5.4 GB' in '\n'.join(setup(SETUP_WITHOUT_EVAL='1'))


def test_results_keys_are_named_per_set():
    keys = demo_score.named_results('viar', dict(consistency=1.0, fid=2.0, n=5, copy_rate=0.0))
    assert keys == dict(class_consistency_viar=1.0, fid_viar=2.0, n_samples_viar=5, copy_rate_viar=0.0)


# ----------------------------------------------------------------------------- labelled grid
def _write_samples(root, classes, seeds, side=8, seed=0):
    """gen_img.py-style files class{c}_seed{s}.png of random gray images under root/var-slim/."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(root / 'var-slim', exist_ok=True)
    for c in classes:
        for s in seeds:
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / 'var-slim' / f'class{c}_seed{s}.png')


def test_labelled_size_arithmetic():
    assert demo_score.labelled_size([(40, 30), (34, 20)], gap=5, header=16, label=14) == (56, 14 + 30 + 5 + 20)
    assert demo_score.block_offsets([30, 20, 10], gap=5, left=14) == [14, 49, 74]


def test_comparison_grid_has_a_named_header_band_and_row_labels(tmp_path):
    classes, seeds, scale, pad = [0, 1, 2], [0, 1, 2, 3], 2, 3
    for name in ('a', 'b'):
        _write_samples(tmp_path / name, classes, seeds)
    grid = demo_score.comparison_grid([tmp_path / 'a', tmp_path / 'b'], ['VIAR', 'VAR'], scale=scale, pad=pad,
                                      gap=12, max_seeds=3)
    tile = 8 * scale
    block_hw = (len(classes) * (tile + pad) + pad, 3 * (tile + pad) + pad)     # max_seeds=3 of 4 columns
    assert grid.shape == demo_score.labelled_size([block_hw, block_hw], 12) + (3,)
    H, L = demo_score.HEADER_PX, demo_score.LABEL_PX
    header, labels = grid[:H], grid[H:, :L]
    assert (header < 128).any() and (labels < 128).any()                 # ink: the names and the digits
    for i in range(len(classes)):                                        # one digit label beside each row
        y = pad + i * (tile + pad)
        assert (labels[y:y + tile] < 128).any()
    # each name sits over its own block: ink in both halves of the header band
    mid = L + block_hw[1] + 6
    assert (header[:, L:mid] < 128).any() and (header[:, mid:] < 128).any()
    unlabelled = demo_score.comparison_grid([tmp_path / 'a'], [], scale=scale, pad=pad)
    assert (unlabelled[:H] == 255).all()                                 # no names: a blank band


# ----------------------------------------------------------------------------- schedule table
def test_table_rows_parse_and_name_their_schedule():
    base = demo_table.Setting('viar', cfg=1.5, top_k=0, top_p=0.0)
    s = demo_table.parse_setting('viar:iters=8-2,cfg=0.5,top_k=16', base)
    assert (s.iter_left, s.iter_right, s.cfg, s.top_k, s.top_p) == (8, 2, 0.5, 16, 0.0)
    assert s.label == 'VIAR Dec.(8,2)'
    assert demo_table.parse_setting('viar:iters=2', base).label == 'VIAR Con.(2,2)'
    assert demo_table.parse_setting('var', base).label == 'VAR'
    for bad in ('vit', 'viar:temp=1'):
        with pytest.raises(ValueError):
            demo_table.parse_setting(bad, base)


def test_seed_sets_are_disjoint_and_the_first_is_the_demos():
    sets = demo_table.seed_sets(3, 4)
    assert sets[0] == [0, 1, 2, 3] and sum(map(len, sets)) == len(set(sum(sets, []))) == 12
    assert image_list([0, 1], [5, 6]) == [(0, 5), (0, 6), (1, 5), (1, 6)]   # class-major, as gen_img.py


def test_spread_pareto_front_and_resolvable():
    assert demo_table.spread([1.0, 3.0]) == dict(mean=2.0, std=pytest.approx(2 ** 0.5), min=1.0, max=3.0)
    assert demo_table.spread([2.0])['std'] == 0.0
    # (FID, images/s): row 1 is beaten by row 0 on both axes; 0, 2 and 3 trade one for the other
    assert demo_table.pareto_front([1.0, 2.0, 3.0, 0.5], [10.0, 5.0, 20.0, 1.0]) == [0, 2, 3]
    assert demo_table.pareto_front([1.0, 1.0], [5.0, 5.0]) == [0, 1]      # ties beat nobody
    a, b = dict(mean=1.0, std=0.1), dict(mean=1.3, std=0.1)
    assert demo_table.resolvable(a, b) and not demo_table.resolvable(a, dict(mean=1.15, std=0.1))


def test_table_samples_do_not_depend_on_the_batch_and_every_figure_is_reported(digit_judge):
    _, var = tiny_vae_var(True, num_classes=3)     # 8 px images: box-averaged to the 64 pixel features
    setting = demo_table.Setting('viar', cfg=1.5, top_k=0, top_p=0.0, iter_left=2, iter_right=1)
    plan = image_list([0, 1, 2], [0, 1, 2])
    x3, y3, _, _ = demo_table.sample_features(var, setting, plan, batch_size=3)
    x4, y4, _, _ = demo_table.sample_features(var, setting, plan, batch_size=4)
    assert np.array_equal(x3, x4) and np.array_equal(y3, y4) and x3.shape == (9, 64)
    judge = digit_judge[0]
    other = demo_table.Setting('viar', cfg=0.0, top_k=0, top_p=0.0, iter_left=1, iter_right=1)
    rows = demo_table.run_table({'viar': var}, judge, [setting, other], demo_table.seed_sets(2, 3), 4, 'train',
                                classes=[0, 1, 2], log=lambda line: None)
    assert [r['iters'] for r in rows] == [[2, 1, 1, 1], [1, 1, 1, 1]] and rows[0]['n_per_set'] == 9
    for fig in demo_table.FIGURES:
        assert len(rows[0]['per_set'][fig]) == 2 and np.isfinite(rows[0][fig]['mean']), fig
    assert rows[0]['images_per_s']['min'] > 0 and rows[0]['images_per_s_wall']['min'] > 0
    # set 0 of the table is the same images as a direct draw of seeds 0..2
    direct = demo_quality.score(judge, x3, y3)
    assert rows[0]['per_set']['fid'][0] == pytest.approx(direct['fid'])
    assert 'VIAR Dec.(2,1)' in demo_table.markdown_table(rows)


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(quick_demo, quick_demo_console):
    """DEMO_QUICK=1: a few steps of every stage; checks the outputs, not the quality, and what the console shows:
    progress lines while a stage runs (the interval lowered to a second), the headline at the end."""
    out, console = quick_demo, quick_demo_console
    for stage, names in (('2/5', ['tokenizer']), ('3/5', ['VIAR', 'VAR']), ('4/5', ['VIAR', 'VAR'])):
        for name in names:
            assert re.search(rf'^\[demo \d+s\] {stage} {name}: (starting|(step|images) \d+/\d+ \(\d+%\)), \d+',
                             console, re.M), (stage, name, console[-3000:])
    for log in ('vae.stdout', 'viar.stdout', 'var.stdout', 'gen_viar.stdout', 'gen_var.stdout'):
        assert console.count(f'(log: {out / log})') == 1, log       # each log file named once
    assert re.search(r'^\[demo \d+s\] 3/5 VIAR: step 3/3 \(100%\)', console, re.M)
    headline = console[console.index('demo: VIAR beside VAR'):]
    assert 'FID: lower is better' in headline and f'grid: {out / "grid.png"}' in headline
    assert re.search(r'^VIAR +\d+\.\d\d +\d\.\d\d', headline, re.M) and "Next: explore the demo's models" in headline
    assert 'load_average_end' not in console and 'n_ref_train' not in console   # the full JSON stays in the file
    results = json.loads((out / 'results.json').read_text())
    for key in ('class_consistency_viar', 'class_consistency_var', 'classifier_acc_real', 'recon_mse'):
        assert 0 <= results[key] <= 1, key
    assert results['classifier_acc_real'] > 0.9        # logistic regression on real 8x8 digits
    assert results['n_samples_viar'] == results['n_samples_var'] == 20
    for name in ('viar', 'var', 'real'):                 # the quality figures exist and are finite, in range
        for fig in ('fid', 'precision', 'recall', 'diversity', 'copy_rate'):
            value = results[f'{fig}_{name}']
            assert isinstance(value, float) and np.isfinite(value), (fig, name, value)
            assert value >= 0 and (fig in ('fid', 'diversity') or value <= 1), (fig, name, value)
    assert results['diversity_real'] == pytest.approx(1.0)
    assert results['fid_real'] < 1.0 and results['precision_real'] > 0.8 and results['recall_real'] > 0.8
    assert results['feature_width'] == demo_quality.FEATURE_WIDTH and results['feature_net_acc_real'] > 0.9
    assert results['n_ref_train'] + results['n_real_val'] == 1797
    assert 0 < results['params_viar'] < results['params_var']
    assert results['seconds'] > 0
    assert set(results['cpu_seconds_by_stage']) == {'digits', 'tokenizer', 'transformers', 'samples', 'scores'}
    assert 0 < results['quiet_estimate_seconds'] <= results['cpu_seconds']
    for path in ('vae/vae.pth', 'viar/viar-slim.pth', 'var/var-slim.pth', 'grid.png'):
        assert (out / path).is_file(), path
    # the exports record the demo's sampling settings, and the demo's own samples were drawn with them
    from utils.checkpoint import read_checkpoint
    record = dict(cfg=0.0, top_k=0, top_p=0.0)
    assert read_checkpoint(str(out / 'viar' / 'viar-slim.safetensors'))['sampling'] == dict(record, iter_left=4,
                                                                                           iter_right=4)
    assert read_checkpoint(str(out / 'var' / 'var-slim.pth'))['sampling'] == record
    assert 'cfg 0, top-k 0, top-p 0; schedule Con.(4,4)' in (out / 'gen_viar.stdout').read_text()
    from PIL import Image
    w, h = Image.open(out / 'grid.png').size
    assert h > w / 2 > 0    # two blocks of 10 rows x 2 columns side by side: taller than half its width
    tile = 16 * 4 + 3
    assert (h, w) == demo_score.labelled_size([(10 * tile + 3, 2 * tile + 3)] * 2, 12)


def readme_next_section() -> str:
    """The README's "Next: explore the demo's models" section."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    return text.split("## Next: explore the demo's models", 1)[1].split('\n## ', 1)[0]


def readme_walkthrough() -> List[str]:
    """The command lines of the README's "Next: explore the demo's models" block, comments dropped."""
    block = readme_next_section().split('```bash\n', 1)[1].split('```', 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith('#')]


def readme_grid_paths() -> List[str]:
    """The grid files the walk-through's text tells a reader to compare, shell braces expanded."""
    paths = []
    for path in re.findall(r'`(demo_output/[^`]*_grid\.png)`', readme_next_section()):
        m = re.search(r'\{([^}]*)\}', path)
        paths += [path[:m.start()] + alt + path[m.end():] for alt in m.group(1).split(',')] if m else [path]
    return paths


def test_readme_names_the_quick_demo_and_the_cost_of_the_walkthrough():
    """The README's first block stays two commands and names DEMO_QUICK=1 beside the demo; the walk-through gives
    sampling.py's cost in CPU seconds (a loaded machine's wall time is no figure to plan by)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    block, rest = text.split('```bash\n', 1)[1].split('```', 1)
    commands = [ln for ln in block.splitlines() if ln.strip()]
    assert len(commands) == 2 and commands[0].startswith('bash scripts/demo.sh')
    assert 'DEMO_QUICK=1' in commands[0] + rest.split('\n\n', 2)[1] and '1.5 min' in commands[0] + rest[:400]
    assert re.search(r"`sampling\.py`'s 500 images: [\d-]+ s of CPU time", readme_next_section())
    assert readme_grid_paths() == ['demo_output/next/con1/viar-slim/class3_seeds0_1_2_3_etc8_grid.png',
                                   'demo_output/next/dec8_2/viar-slim/class3_seeds0_1_2_3_etc8_grid.png']


@pytest.mark.slow
def test_readme_walkthrough_runs_on_a_quick_demo(quick_demo, tmp_path):
    """Every command of the README's walk-through runs as written, with demo_output/ pointed at a quick demo, and
    does what the README says it does."""
    lines = readme_walkthrough()
    assert len(lines) >= 8 and all(ln.startswith('.venv/bin/python ') for ln in lines)
    logs = []
    from PIL import Image
    for line in lines:
        cmd = line.replace('demo_output', str(quick_demo)).replace('.venv/bin/python', sys.executable, 1)
        proc = subprocess.run(['bash', '-c', cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
        logs.append(proc.stdout + proc.stderr)
    out = quick_demo / 'next'
    assert 'schedule Con.(1,1): 1,1,1,1' in logs[0] and 'schedule Dec.(8,2): 8,6,4,2' in logs[1]
    # no sampling flag typed: every tool samples with the demo's recorded settings, and says so
    for log in (logs[0], logs[2], logs[4], logs[5]):
        assert 'sampling defaults from the file: cfg 0, top_k 0, top_p 0' in log
    assert 'cfg 0, top-k 0, top-p 0; schedule Con.(1,1)' in logs[0]
    assert 'schedule Con.(4,4): 4,4,4,4 iterations per scale' in logs[5]   # sampling.py at the demo's schedule
    for run in ('con1', 'dec8_2', 'adaptive'):
        assert len(list((out / run).glob('**/class3_seed[0-9].png'))) == 8, run
    for path in readme_grid_paths():          # the grids the text names exist, their 16 px cells enlarged to 64
        grid = quick_demo / path.removeprefix('demo_output/')
        assert grid.is_file(), path
        w, h = Image.open(grid).size
        assert h == 2 + 2 * 66 and w >= 2 + 4 * 66   # 8 seeds, 4 a row, 2 px apart (and a margin for row names)
    conv = json.loads((out / 'convergence' / 'convergence.json').read_text())
    taus, reached = conv['suggested_tau'], conv['iters_to_target']
    assert len(taus) == 4 and all(t > 0 for t in taus)
    # the adaptive run stops each scale where convergence.py said the cosine target is reached, counted alike
    for n, pn in zip(reached, (1, 2, 3, 4)):
        assert f'{pn}x{pn}' in logs[2] and (f'after {n} iteration' in logs[2] if n else 'not reached' in logs[2])
    if None not in reached:
        assert f"implicit iterations per scale: {','.join(map(str, reached))} " in logs[3], (logs[2], logs[3])
    assert len(list((out / 'edit').glob('**/edit_class8_seed[0-9].png'))) == 4
    scores = json.loads((out / 'fid' / 'scores.json').read_text())
    assert scores['n_samples_viar'] == 500 and np.isfinite(scores['fid_viar'])
    # scored as the demo scores its own samples: copies among the demo tokenizer's reconstructions, same threshold
    demo = json.loads((quick_demo / 'results.json').read_text())
    for key in ('copy_space', 'copy_threshold', 'fid_real', 'fid_recon', 'recon_mse'):
        assert scores[key] == demo[key], key
    # and the walk-through's form of the command gives the demo's own figures for the demo's own samples
    again = tmp_path / 'again.json'
    demo_score.main(['--data_path', str(quick_demo / 'digits'), '--viar_samples', str(quick_demo / 'samples' / 'viar'),
                     '--out', str(again)])
    again = json.loads(again.read_text())
    for fig in ('fid', 'precision', 'recall', 'diversity', 'copy_rate', 'class_consistency'):
        assert again[f'{fig}_viar'] == demo[f'{fig}_viar'], fig
    assert len(json.loads((out / 'bench' / 'sample_speed.json').read_text())['rows']) == 4
