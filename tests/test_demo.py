"""The digits demo: data writing and scoring helpers, and a shortened run of scripts/demo.sh end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny import tiny_vae_var

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import demo_score  # noqa: E402
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
    acc = demo_score.per_class_accuracy(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert acc == {0: 1.0, 1: 0.5, 2: 1.0}


@pytest.mark.parametrize('use_implicit', [False, True])
def test_param_count_from_state_dict_matches_the_model(use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    assert demo_score.count_params(var.state_dict()) == sum(p.numel() for p in var.parameters())
    assert demo_score.count_params(vae.state_dict()) == sum(p.numel() for p in vae.parameters())


def test_quick_demo_runs_end_to_end(tmp_path):
    """DEMO_QUICK=1: a few steps of every stage; checks the outputs, not the quality."""
    out = tmp_path / 'demo'
    env = dict(os.environ, DEMO_QUICK='1', DEMO_OUT=str(out))
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    for key in ('class_consistency_viar', 'class_consistency_var', 'classifier_acc_real', 'recon_mse'):
        assert 0 <= results[key] <= 1, key
    assert results['classifier_acc_real'] > 0.9        # logistic regression on real 8x8 digits
    assert results['n_samples_viar'] == results['n_samples_var'] == 20
    assert 0 < results['params_viar'] < results['params_var']
    assert results['seconds'] > 0
    for path in ('vae/vae.pth', 'viar/var-slim.pth', 'var/var-slim.pth', 'grid.png'):
        assert (out / path).is_file(), path
    from PIL import Image
    w, h = Image.open(out / 'grid.png').size
    assert h > w / 2 > 0    # two blocks of 10 rows x 2 columns side by side: taller than half its width
