"""utils/train/lr_control.py: the lr and wd schedules (official formulas, warm-up, progressive stages) and the weight-decay split."""
import math

import pytest

from utils.train.lr_control import lr_ratio, param_groups, prog_stage, prog_warmup, wd_at
from tests.tiny import tiny_vae_var


def test_lr_warmup_is_linear_from_wp0_to_one():
    wp, wp0 = 10, 0.005
    assert lr_ratio('lin0', 0, wp, 110, wp0, 0.01) == pytest.approx(wp0)
    assert lr_ratio('lin0', 5, wp, 110, wp0, 0.01) == pytest.approx(wp0 + (1 - wp0) * 0.5)
    assert lr_ratio('lin0', 10, wp, 110, wp0, 0.01) == pytest.approx(1.0)


@pytest.mark.parametrize('wp_it', [0.0, 0.4])
def test_lr_without_warmup_steps_starts_at_the_peak(wp_it):
    """A warm-up that rounds to 0 steps (e.g. --wp 0, or 0.4 of a step) is no warm-up: the schedule starts at the
    peak at step 0 and decays over all 10 intervals of an 11-step run, e.g. lin00: 1 - 0.99 * it / 10."""
    for sche in ('lin00', 'cos'):
        assert lr_ratio(sche, 0, wp_it, 11, 0.005, 0.01) == pytest.approx(1.0, abs=1e-12)
        assert lr_ratio(sche, 5, wp_it, 11, 0.005, 0.01) == pytest.approx(0.505, abs=1e-12)   # half way in both
        assert lr_ratio(sche, 10, wp_it, 11, 0.005, 0.01) == pytest.approx(0.01, abs=1e-12)
    assert lr_ratio('lin00', 2, wp_it, 11, 0.005, 0.01) == pytest.approx(0.802, abs=1e-12)   # 1 - 0.99 * 0.2
    policy = _policy(total=11, sche='lin00', wp_it=wp_it, peak_lr=2.0)
    lrs = [policy.schedule_at(g).lr for g in range(11)]
    assert lrs == pytest.approx([2.0 - 0.198 * g for g in range(11)], abs=1e-12)


def test_lr_warmup_of_under_one_and_a_half_steps_is_one_step():
    """wp 0.6 rounds to 1: step 0 at wp0, then the decay from the peak over the 9 intervals left."""
    assert lr_ratio('lin00', 0, 0.6, 11, 0.005, 0.01) == pytest.approx(0.005, abs=1e-12)
    assert lr_ratio('lin00', 1, 0.6, 11, 0.005, 0.01) == pytest.approx(1.0, abs=1e-12)
    assert lr_ratio('lin00', 10, 0.6, 11, 0.005, 0.01) == pytest.approx(0.01, abs=1e-12)


@pytest.mark.parametrize('sche,frac,want', [
    # post-warmup fraction p = (it - wp) / (max - 1 - wp); values from the official formulas
    ('lin0', 0.04, 1.0), ('lin0', 0.525, 0.01 + 0.99 * 0.475 / 0.95), ('lin0', 1.0, 0.01),
    ('lin', 0.10, 1.0), ('lin', 0.575, 0.01 + 0.99 * 0.425 / 0.85),
    ('lin00', 0.25, 0.01 + 0.99 * 0.75),
    ('cos', 0.5, 0.01 + 0.99 * 0.5), ('cos', 1.0, 0.01),
    ('exp', 0.15 + 0.85 / 2, math.exp(0.5 * math.log(0.01))), ('exp', 1.0, 0.01),
    ('lin0.5', 0.25, 1 + ((1 + 0.01 + 0.99 * 0.5) / 2 - 1) * 0.5),
])
def test_lr_after_warmup_matches_official_formula(sche, frac, want):
    wp, max_it = 100, 100 + 1 + 4000   # 4000 post-warmup intervals: frac * 4000 is an integer
    it = wp + round(frac * 4000)
    assert lr_ratio(sche, it, wp, max_it, 0.005, 0.01) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize('sche', ['lin0', 'lin', 'lin00', 'cos', 'exp', 'lin0.3'])
def test_lr_never_increases_after_warmup_and_ends_at_wpe(sche):
    vals = [lr_ratio(sche, it, 20, 500, 0.005, 0.02) for it in range(20, 500)]
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[0] == pytest.approx(1.0) and vals[-1] == pytest.approx(0.02)


def test_lr_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match='unknown lr schedule'):
        lr_ratio('bogus', 50, 10, 100)


def test_wd_is_a_half_cosine_from_twd_to_twde():
    assert wd_at(0.05, 0.08, 0, 101) == pytest.approx(0.05)
    assert wd_at(0.05, 0.08, 50, 101) == pytest.approx(0.065)
    assert wd_at(0.05, 0.08, 100, 101) == pytest.approx(0.08)


def test_progressive_stage_and_warmup():
    # off, then pg0 during warmup, growing to all scales (-1) at pg * max_it
    assert prog_stage(5, 10, 100, 0.0, 4, 10) == -1
    assert prog_stage(5, 10, 100, 0.5, 2, 10) == 2
    assert prog_stage(60, 10, 100, 0.5, 2, 10) == -1
    stages = [s if s >= 0 else 99 for s in (prog_stage(g, 10, 100, 0.5, 2, 10) for g in range(11, 50))]
    assert stages == sorted(stages) and stages[0] == 2 and stages[-1] == 99
    assert prog_warmup(1, 10, first_stage=True) == 1.0
    assert prog_warmup(0, 10, first_stage=False) == 0.01 and prog_warmup(5, 10, False) == 0.5


@pytest.mark.parametrize('use_implicit', [False, True])
def test_param_groups_follow_the_official_rule(use_implicit):
    _, var = tiny_vae_var(use_implicit)
    names, params, groups = param_groups(var)
    assert len(names) == len(list(var.parameters()))
    by_group = {g['wd_sc']: set(g['names']) for g in groups}
    nd, d = by_group[0.0], by_group[1.0]
    assert not (nd & d) and len(nd) + len(d) == len(names)
    assert all(name in nd for name, p in var.named_parameters() if p.ndim == 1)   # gains and biases never decay
    # spot checks: embeddings with special names, attention scales, gains are exempt; matrices decay
    for name in ('pos_1LC', 'pos_start', 'lvl_embed.weight', 'word_embed.bias'):
        assert name in nd
    assert 'class_emb.weight' in d and 'head.weight' in d and 'word_embed.weight' in d
    assert any('scale_mul' in n for n in nd) and any(n.endswith('mat_qkv.weight') for n in d)
    if use_implicit:
        assert 'implicit_block_projection.0.weight' in d and 'implicit_block_projection.0.bias' in nd


def _policy(**kw):
    from utils.train.policy import StepPolicy
    base = dict(total=12, iters_ep=4, ac=1, peak_lr=1.0, wd=0.05, wd_end=0.05, sche='lin0', wp_it=2.0, wp0=0.5,
                wpe=0.01, pg=0.0, pg0=4, num_scales=10, save_freq=2, save_every_steps=0, val_every=0, log_every=5)
    base.update(kw)
    return StepPolicy(**base)
