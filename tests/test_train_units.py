"""Training building blocks: lr/wd schedules, weight-decay split, flags and derived values, sampler, EMA, AMP step."""
import math
import os
import re

import pytest
import torch

import dist
from models.config import ModelSpec
from tests.hooked_train import parse_steps
from utils.arch_flags import given_fields
from utils.train import args as arg_util
from utils.train.amp_opt import AmpOptimizer, build_adamw
from utils.data.sampler import DistInfiniteBatchSampler, EvalDistributedSampler, epoch_permutation
from utils.train.ema import ModelEMA, ema_decay_at
from utils.train.lr_control import lr_ratio, param_groups, prog_stage, prog_warmup, wd_at
from tests.tiny import tiny_vae_var

RECIPE = ('--data_path=/x --depth=30 --bs=512 --ep=550 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 '
          '--twde=0.08 --use_implicit=True --p_depth=5').split()


# ---------------------------------------------------------------- lr / wd schedules

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


# ---------------------------------------------------------------- weight-decay split

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


# ---------------------------------------------------------------- flags and derived values

def test_official_recipe_flags_and_derived_values():
    args = arg_util.parse_args(RECIPE)
    assert args.arch.use_implicit is True and args.arch.p_depth == 5 and args.optim.fp16 == 1
    der = arg_util.derive(args, world_size=8)
    assert der.batch_size == 64 and der.glb_batch_size == 512
    assert der.lr == pytest.approx(8e-5 * 512 / 256)
    assert der.wd == 0.05 and der.wd_end == 0.08 and der.wp_ep == pytest.approx(550 / 50)
    assert der.final_reso == 256 and der.mid_reso_px == 288 and der.precision == 'fp16'
    spec = ModelSpec(**given_fields(args.arch))
    assert spec.width == 1920 and spec.heads == 30 and der.sche == 'lin0'
    assert der.jfb_no_grad == (0, 10) and der.jfb_with_grad == (1, 12)


def test_scripts_train_sh_is_the_official_recipe():
    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'train.sh')).read()
    flags = re.findall(r'^\s+(--\w+=[^\s"$]+)', text.split('train.py \\')[1], flags=re.M)
    assert set(RECIPE[1:]) <= set(flags)
    assert 'torch.distributed.run' in text and '--nproc_per_node="$NPROC"' in text and 'NPROC=${NPROC:-8}' in text
    der = arg_util.derive(arg_util.parse_args(['--data_path=/x'] + flags), world_size=8)
    assert der.batch_size == 64 and der.precision == 'fp16'


def test_derived_batch_lr_and_resolution_rules():
    a = arg_util.parse_args(['--bs', '48', '--ac', '2', '--tblr', '1e-4', '--pn', '1_2_4', '--patch_size', '4',
                             '--vae_ch_mult', '1_2_4', '--mid_reso', '1.5', '--twde', '0'])
    der = arg_util.derive(a, world_size=3)
    assert der.batch_size == 8 and der.glb_batch_size == 24
    assert der.lr == pytest.approx(1e-4 * 48 / 256) and der.wd_end == der.wd
    assert der.final_reso == 16 and der.mid_reso_px == 24 and der.resos == (4, 8, 16)
    assert arg_util.derive(arg_util.parse_args(['--tlr', '3e-3']), 1).lr == 3e-3
    assert arg_util.derive(arg_util.parse_args(['--pn', '512']), 1).final_reso == 512
    assert arg_util.derive(arg_util.parse_args(['--bf16']), 1).precision == 'bf16'
    assert arg_util.derive(arg_util.parse_args(['--pg', '0.5']), 1).sche == 'lin0.5'


@pytest.mark.parametrize('argv,world,match', [
    (['--bs', '10'], 4, '--bs 10 cannot be split over 4 rank'),
    (['--bs', '12', '--ac', '5'], 1, 'multiple of 5'),
    (['--patch_size', '8'], 1, 'must equal the tokenizer downsampling'),
    (['--fp16', '1', '--bf16'], 1, 'pick one'),
    (['--jfb_n', '3_1'], 1, '--jfb_n must be two integers'),
    (['--jfb_m', '0_4'], 1, '--jfb_m must be two integers'),
    (['--use_implicit', '--depth', '8', '--p_depth', '4'], 1, '2 \\* --p_depth < --depth'),
])
def test_bad_flag_combinations_are_one_line_errors(argv, world, match):
    with pytest.raises(SystemExit, match=match) as e:
        arg_util.derive(arg_util.parse_args(argv), world)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('text,want', [('True', True), ('False', False), ('1', True), ('0', False),
                                       ('true', True), ('false', False)])
def test_booleans_parse_words_digits_and_bare_flags(text, want):
    assert arg_util.parse_args([f'--use_implicit={text}']).arch.use_implicit is want
    assert arg_util.parse_args(['--hflip', text]).data.hflip is want
    assert arg_util.parse_args(['--hflip']).data.hflip is True


def test_jfb_ranges_as_pairs_or_four_ints_and_round_trip():
    a = arg_util.parse_args(['--jfb_n', '2_5', '--jfb_m', '1,3'])
    assert (a.model.jfb_n, a.model.jfb_m) == ((2, 5), (1, 3))
    b = arg_util.parse_args(['--jfb', '0', '4', '2', '6'])
    assert (b.model.jfb_n, b.model.jfb_m) == ((0, 4), (2, 6))
    assert arg_util.args_from_dict(b.to_dict()) == b
    assert parse_steps('3-5') == (3, 4, 5) and parse_steps('1_7') == (1, 7)


def test_every_official_training_flag_exists():
    flags = {s[2:] for a in arg_util.build_parser()._actions for s in a.option_strings}
    official = ('depth ini hd aln alng fp16 tblr tlr twd twde tclip ls bs ac ep wp wp0 wpe sche opt saln anorm pn '
                'patch_size mid_reso hflip workers pg pg0 pgwp seed use_implicit p_depth save_freq data_path '
                'exp_name local_out_dir_path').split()
    assert set(official) <= flags


# ---------------------------------------------------------------- sampler

def _epoch_batches(world, glb, n=13, seed=3, epochs=2):
    out = []
    for r in range(world):
        s = DistInfiniteBatchSampler(n, glb, rank=r, world_size=world, seed=seed)
        it = iter(s)
        out.append([next(it) for _ in range(epochs * len(s))])
    # global batch k = concatenation of the ranks' k-th local batches
    return [sum((out[r][k] for r in range(world)), []) for k in range(len(out[0]))]


def test_global_batches_do_not_depend_on_world_size_and_cover_the_epoch():
    one, two = _epoch_batches(1, 4), _epoch_batches(2, 4)
    assert one == two
    first_epoch = [idx for batch in one[:4] for idx, _ in batch]
    assert set(first_epoch) == set(range(13)) and len(first_epoch) == 16   # last batch filled from the start
    assert [i for b in one[:4] for i, _ in b] != [i for b in one[4:] for i, _ in b]   # reshuffled per epoch
    seeds = [s for b in one for _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_sampler_resumes_at_its_saved_position():
    s = DistInfiniteBatchSampler(11, 4, seed=5)      # 3 global batches per epoch, the last topped up by 1
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.position_at(5)   # the next batch
    tail = [next(it) for _ in range(6)]
    run = head + tail
    for e in range(3):   # epoch e: its permutation in batches of 4, the last one padded with the permutation's start
        perm = epoch_permutation(5, e, 11)
        assert sorted(perm) == list(range(11))
        assert [[i for i, _ in b] for b in run[3 * e:3 * e + 3]] == [perm[0:4], perm[4:8], perm[8:11] + perm[:1]], e
    t = DistInfiniteBatchSampler(11, 4, seed=5)
    t.load_state_dict(state)
    ti = iter(t)
    assert [next(ti) for _ in range(6)] == tail
    for r in range(len(run)):   # same batches, augmentation seeds included, whatever the restart point
        u = DistInfiniteBatchSampler(11, 4, seed=5)
        u.load_state_dict(u.position_at(r))
        ui = iter(u)
        assert [next(ui) for _ in range(len(run) - r)] == run[r:], f'restart at batch {r}'


def test_eval_sampler_splits_without_overlap():
    parts = [EvalDistributedSampler(10, r, 3).indices for r in range(3)]
    assert sum(parts, []) == list(range(10))


# ---------------------------------------------------------------- EMA, AMP step, dist

def test_ema_follows_the_weights_with_warmed_up_decay():
    lin = torch.nn.Linear(2, 2)
    ema = ModelEMA(lin, 0.9)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    d = ema_decay_at(0.9, 0)
    assert d == pytest.approx(0.1)
    assert torch.allclose(ema.shadow['weight'], d * start + (1 - d) * lin.weight)
    assert ema_decay_at(0.9, 10 ** 6) == 0.9
    _, var = tiny_vae_var(True)   # buffers holding -inf (the attention mask) are copied, not averaged
    ema = ModelEMA(var, 0.99)
    ema.update(var)
    assert torch.equal(ema.shadow['attn_bias_for_masking'], var.attn_bias_for_masking)


def test_non_finite_gradients_skip_the_step():
    lin = torch.nn.Linear(3, 1)
    _, params, groups = param_groups(lin)
    opt = AmpOptimizer(build_adamw(groups, 0.1, torch.device('cpu')), params, 'fp32', grad_clip=1.0)
    before = [p.detach().clone() for p in lin.parameters()]
    opt.backward((lin(torch.ones(1, 3)) * float('inf')).sum())
    res = opt.step()
    assert not res.stepped and all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    opt.backward(lin(torch.ones(1, 3)).sum())
    res = opt.step()
    assert res.stepped and res.grad_norm > 0 and not torch.equal(before[0], lin.weight)


def test_collectives_are_no_ops_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert dist.get_world_size() == 1 and dist.is_master()
    assert torch.equal(dist.allreduce_sum(t.clone()), t) and torch.equal(dist.allreduce_max(t.clone()), t)
    assert dist.broadcast_object({'b': 2}) == {'b': 2}
    assert dist.all_gather_object({'a': 1}) == [{'a': 1}]
    dist.barrier()


# ---------------------------------------------------------------- the step policy (utils/train/policy.py)

def _policy(**kw):
    from utils.train.policy import StepPolicy
    base = dict(total=12, iters_ep=4, ac=1, peak_lr=1.0, wd=0.05, wd_end=0.05, sche='lin0', wp_it=2.0, wp0=0.5,
                wpe=0.01, pg=0.0, pg0=4, num_scales=10, save_freq=2, save_every_steps=0, val_every=0, log_every=5)
    base.update(kw)
    return StepPolicy(**base)


def _run_events(policy, start=0):
    """(done, Events) for every forward pass of a run started at `start`."""
    from utils.train.policy import Pending
    out, pending = [], Pending()
    for g_it in range(start, policy.total):
        ev, pending = policy.events_at(g_it + 1, pending, first=g_it == start)
        out.append((g_it + 1, ev))
    return out


def test_policy_saves_every_save_freq_epochs_and_at_the_end_logs_on_schedule():
    ev = dict(_run_events(_policy()))
    assert [d for d, e in ev.items() if e.save] == [8, 12] == [d for d, e in ev.items() if e.validate]
    assert [d for d, e in ev.items() if e.log] == [1, 5, 10, 12]     # first, every 5, last
    assert [d for d, e in _run_events(_policy(), start=6) if e.log] == [7, 10, 12]   # a resume logs at once


def test_policy_defers_events_inside_an_accumulation_window_to_its_end():
    ev = dict(_run_events(_policy(total=12, iters_ep=4, ac=3, save_freq=1)))
    # epoch ends at 4 and 8 fall inside windows (3 forward passes per step): done at 6 and 9, and at the end
    assert [d for d, e in ev.items() if e.save] == [6, 9, 12]
    assert all(d % 3 == 0 for d, e in ev.items() if e.save or e.validate)
    ev = dict(_run_events(_policy(total=16, iters_ep=100, ac=2, save_freq=100, save_every_steps=2, val_every=6)))
    assert [d for d, e in ev.items() if e.save] == [4, 8, 12, 16]    # every 2 optimizer steps, and the end
    assert [d for d, e in ev.items() if e.validate] == [6, 12, 16]


def test_policy_schedule_warms_up_steps_on_window_ends_and_stages_progressively():
    p = _policy(ac=2)
    assert p.schedule_at(0).lr == pytest.approx(0.5) and p.schedule_at(2).lr == pytest.approx(1.0)
    assert [p.schedule_at(g).stepping for g in range(4)] == [False, True, False, True]
    q = _policy(total=100, pg=0.5, pg0=2, wp_it=10)
    stages = [q.schedule_at(g).prog_si for g in range(100)]
    assert stages[0] == 2 and stages[-1] == -1 and stages == sorted(stages, key=lambda s: 99 if s < 0 else s)


def test_tokenizer_events():
    from utils.train.tokenizer_trainer import TokenizerConfig, events_at
    cfg = TokenizerConfig(max_steps=10, restart_every=4, restart_until=0.5, log_every=3, save_every=4, stop_at=6)
    ev = [events_at(s, cfg) for s in range(10)]
    assert [s for s, e in enumerate(ev) if e.restart] == [0, 4]          # every 4, until half the run
    assert [s + 1 for s, e in enumerate(ev) if e.log] == [3, 6, 9, 10]    # every 3 and the last
    assert [s + 1 for s, e in enumerate(ev) if e.save] == [4, 8]          # never at the end: the final save does
    assert [s + 1 for s, e in enumerate(ev) if e.stop] == [6]
