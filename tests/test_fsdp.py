"""train.py --fsdp: FSDP2 sharding of the transformer and sharded checkpoints (dist.py, utils/train/fsdp.py,
utils/train/sharded_ckpt.py).

Fast tests run in this process: the units the model names, the precision policy, the per-rank byte arithmetic
against the shards FSDP2 makes (torch's fake process group, meta device), the implicit block gathered once per
step whatever n + m, the retention rule, and a sharded folder that misses a file or its marker. The slow tests
run torchrun with gloo on the tiny model: FSDP trains what DDP trains, a checkpoint saved by 2 ranks resumes on
1 and on 4 with the same next-step losses, DDP checkpoints resume under --fsdp and back, --compile works.
"""
import json
import os
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import dist
from tests.tiny import tiny_tokens, tiny_vae_var
from utils.train import args as arg_util
from utils.train import sharded_ckpt
from utils.train.fsdp import fsdp_dtypes, measured_rank_bytes, rank_bytes, shard_numel
from utils.train.sharded_ckpt import Entry, IncompleteCheckpoint, stale
from tests.train_helpers import make_image_folder, read_steps, run_train, tiny_flags

# single-process DCP says it assumes one process; that is the point of these tests
pytestmark = pytest.mark.filterwarnings('ignore:torch.distributed is disabled')


# ---------------------------------------------------------------- policy

def test_precision_policy_and_fp16_refusal():
    assert fsdp_dtypes('fp32') == (None, None)
    assert fsdp_dtypes('bf16') == (torch.bfloat16, torch.float32)   # bf16 compute copies, fp32 gradient reduction
    with pytest.raises(SystemExit, match='--fp16=2'):
        fsdp_dtypes('fp16')
    with pytest.raises(SystemExit, match='--fp16=2'):
        arg_util.derive(arg_util.parse_args(['--fsdp', '--fp16=1']), 8)
    assert arg_util.derive(arg_util.parse_args(['--fsdp', '--fp16=2']), 8).precision == 'bf16'
    assert arg_util.parse_args([]).optim.fsdp is False


@pytest.mark.parametrize('implicit,saln', [(False, False), (False, True), (True, False)])
def test_units_cover_every_parameter_once(implicit, saln):
    _, var = tiny_vae_var(implicit, depth=4, shared_aln=saln)
    units = var.fsdp_units()
    owned = [id(p) for unit in units for m in unit for p in m.parameters()]
    assert len(owned) == len(set(owned)), 'a parameter in two units'
    root = {n for n, p in var.named_parameters() if id(p) not in set(owned)}
    assert {'word_embed.weight', 'class_emb.weight', 'head.weight'} <= root
    per_block = 1 if saln else 2   # attention + MLP, and the AdaLN projection unless it is shared
    if implicit:   # pre- and post-blocks sharded; the implicit block and its projection stay in the root's unit
        assert len(units) == per_block * 2
        assert any(n.startswith('implicit_block.') for n in root)
        assert any(n.startswith('implicit_block_projection.') for n in root)
        assert not any(n.startswith(('pre_blocks.', 'post_blocks.')) and 'ada_gss' not in n for n in root)
    else:
        assert len(units) == per_block * 4
        assert all(n.endswith('ada_gss') for n in root if n.startswith('blocks.'))


def test_shard_arithmetic():
    assert shard_numel((10, 3), 4) == 3 * 3          # ceil(10 / 4) rows of 3
    assert shard_numel((10, 3), 1) == 30
    assert shard_numel((1, 1, 6, 8), 2) == 48         # a first dimension of 1 stays on rank 0
    assert shard_numel((), 8) == 1
    b = rank_bytes([(10, 3), (7,)], 2)
    assert (b.params, b.grads) == ((15 + 4) * 4, (15 + 4) * 4)
    assert b.optim == (15 + 4) * 8 + 2 * 4           # two fp32 moments and a step counter per parameter
    assert b.total == b.params + b.grads + b.optim


@pytest.mark.parametrize('world', [2, 3, 64])
@pytest.mark.parametrize('implicit', [False, True])
def test_fake_group_shards_match_the_arithmetic(world, implicit):
    _, var = tiny_vae_var(implicit, depth=4, width=64, heads=2)   # (bench/train_speed.py --mode fsdp_memory: full size, on meta)
    shapes = [tuple(p.shape) for p in var.parameters()]
    with dist.fake_group(world):
        dist.fsdp_shard(var, var.fsdp_units(), torch.bfloat16, torch.float32)
        assert all(dist.is_sharded(p) for p in var.parameters())
        got = measured_rank_bytes(var.parameters(), lambda p: dist.local_part(p).numel())
    assert got == rank_bytes(shapes, world)
    assert not torch.distributed.is_initialized() and not dist.initialized()


def _fsdp_events(var, x_BLCv, plan):
    from torch.profiler import profile
    with profile() as prof:
        var(torch.zeros(x_BLCv.shape[0], dtype=torch.long), x_BLCv, jfb_iters=plan).float().mean().backward()
    return Counter(e.name.split(' (')[0] for e in prof.events() if e.name.startswith('FSDP::'))


def test_implicit_block_gathered_once_per_step_whatever_n_and_m():
    """All-gathers and gradient reductions per step do not grow with the S-JFB iterations (fake group: the
    collectives move no data, the counts are FSDP's own)."""
    vae, var = tiny_vae_var(True, depth=4)
    var.train()
    _, x_BLCv = tiny_tokens(vae, var, 2)
    with dist.fake_group(2):
        dist.fsdp_shard(var, var.fsdp_units())
        counts = [_fsdp_events(var, x_BLCv, plan) for plan in ((0, 1), (2, 2), (6, 5))]
    units = len(var.fsdp_units())
    for c in counts:
        assert c == counts[0]
        assert c['FSDP::root_pre_forward'] == 1
        assert units + 1 <= c['FSDP::all_gather'] <= 2 * units + 1        # forward, and re-gathers in backward
        assert c['FSDP::post_backward_reduce'] == units + 1                 # one gradient reduction per unit


# ---------------------------------------------------------------- sharded checkpoint folders

@pytest.mark.parametrize('entries,want', [
    ([Entry(2, True), Entry(4, True), Entry(6, True)], [2]),
    ([Entry(2, True, best=True), Entry(4, True), Entry(6, True)], []),          # the best stays
    ([Entry(2, True, best=True), Entry(4, True, best=True), Entry(6, True), Entry(8, True)], [2]),
    ([Entry(2, True), Entry(4, False), Entry(6, True), Entry(8, True)], [2, 4]),  # an older unfinished save goes
    ([Entry(2, True), Entry(4, True), Entry(6, False)], []),                   # a newer one may still be written
    ([Entry(6, False)], []),
    ([], []),
])
def test_retention_rule(entries, want):
    assert stale(entries) == want


def _save_folder(out, step, value):
    """A single-process sharded checkpoint of a small state (no process group: DCP writes one shard)."""
    tensors = {'model': {'w': torch.full((4, 3), float(value)), 'b': torch.arange(3.0) + value}}
    return sharded_ckpt.save(str(out), step, tensors, {'g_it': step}, best=False, log=lambda m: None)


def test_folder_is_complete_then_each_damage_is_refused_naming_the_file(tmp_path):
    src = tmp_path / 'src'
    for step in (2, 4):
        _save_folder(src, step, step)
    newest = sharded_ckpt.folder_name(4)
    marker, md = sharded_ckpt.check_folder(str(src / newest))
    assert marker['step'] == 4 and '.metadata' in marker['files'] and 'state.pth' in marker['files']
    assert sharded_ckpt.read_state(str(src / newest)) == {'g_it': 4}
    # load the tensors back through the checked metadata
    into = {'model': {'w': torch.zeros(4, 3), 'b': torch.zeros(3)}}
    dist.dcp_load(into, str(src / newest), md)
    assert torch.equal(into['model']['w'], torch.full((4, 3), 4.0))
    copies = iter(range(100))

    def refused_then_previous(damage, named):
        work = tmp_path / f'work{next(copies)}'
        shutil.copytree(src, work)
        damage(work / newest)
        with pytest.raises(IncompleteCheckpoint, match=named):
            sharded_ckpt.check_folder(str(work / newest))
        warned = []
        step, folder, _ = sharded_ckpt.newest_complete(str(work), warned.append)
        assert step == 2 and folder.endswith(sharded_ckpt.folder_name(2))
        assert len(warned) == 1 and named in warned[0] and newest in warned[0]

    shard = [n for n in marker['files'] if n.endswith('.distcp')][0]
    refused_then_previous(lambda f: os.remove(f / 'complete.json'), 'complete.json')
    refused_then_previous(lambda f: os.remove(f / shard), shard)
    refused_then_previous(lambda f: open(f / shard, 'ab').write(b'x'), shard)              # another size
    refused_then_previous(lambda f: os.remove(f / 'state.pth'), 'state.pth')

    def hostile_metadata(f):   # a pickle that would run code, with the marker's size record made to match
        payload = b'cos\nsystem\n(S"echo pwned"\ntR.'
        (f / '.metadata').write_bytes(payload)
        m = json.loads((f / 'complete.json').read_text())
        m['files']['.metadata'] = len(payload)
        (f / 'complete.json').write_text(json.dumps(m))
    refused_then_previous(hostile_metadata, 'os.system')


def test_retention_on_disk_keeps_the_newest_two(tmp_path):
    for step in (2, 4, 6, 8):
        _save_folder(tmp_path, step, step)
    assert [s for s, _ in sharded_ckpt.folders(str(tmp_path))] == [8, 6]


def test_ddp_optimizer_state_rekeyed_by_name_loads_into_a_fresh_optimizer():
    """What a DDP checkpoint resumed under --fsdp goes through (dist.set_model_optim_state with full tensors)."""
    from utils.train.lr_control import param_groups
    vae, var = tiny_vae_var(True)
    var.train()
    _, x_BLCv = tiny_tokens(vae, var, 2)

    def adamw(model):
        _, _, groups = param_groups(model)
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != 'names'} for g in groups], lr=1e-3)
    opt = adamw(var)
    var(torch.zeros(2, dtype=torch.long), x_BLCv, jfb_iters=(1, 1)).float().mean().backward()
    opt.step()
    _, twin = tiny_vae_var(True, seed=5)
    opt2 = adamw(twin)
    name_of = {id(p): n for n, p in var.named_parameters()}
    names = [name_of[id(p)] for g in opt.param_groups for p in g['params']]
    osd = sharded_ckpt.optim_by_name(opt.state_dict(), names)
    dist.set_model_optim_state(twin, opt2, var.state_dict(), osd, full=True)
    for (n, p), (_, q) in zip(var.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n
        for k in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), (n, k)


# ---------------------------------------------------------------- torchrun (slow): train, save, resume elsewhere

STEPS = 6                                                  # --ep=3 x 2 iterations (16 images, global batch 8)
RUN = ('--ep=3', '--save_every_steps=2', '--ema=0.9')     # checkpoints after steps 2, 4, 6; validation at the end


def _mean_losses(out):
    """{step: loss averaged over the ranks' step logs} (each rank's loss is the mean over its rows)."""
    logs = [read_steps(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.startswith('steps-rank')]
    return {s: sum(log[s]['loss'] for log in logs) / len(logs) for s in logs[0]}, logs


def _val_loss(out):
    lines = [ln for ln in open(os.path.join(out, 'log.txt')) if '[val]' in ln]
    return float(lines[-1].split(' Lm ')[1].split()[0]), lines[-1]


def _ok(r):
    assert r.returncode == 0, (r.stdout[-2000:] + r.stderr[-4000:])
    return r


def _close(a, b, steps):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=2e-5, abs=1e-6), (s, a[s], b[s])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """An --fsdp run on 2 ranks (auto loader workers), and a DDP run of the same flags killed after step 5 (its
    ar-ckpt-last.pth holds step 4). 13 val images: rank 0 gets one val batch, rank 1 two."""
    root = tmp_path_factory.mktemp('fsdp')
    data = make_image_folder(str(root / 'data'), classes=2, per_class=8, val_per_class=6)
    shutil.copy(os.path.join(data, 'val', 'class0', '0.png'), os.path.join(data, 'val', 'class0', 'extra.png'))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('VIAR_DIST_TIMEOUT_S', '90')   # a rank stuck in a collective fails the run, not the suite
        fsdp = str(root / 'fsdp')
        _ok(run_train(tiny_flags(data, fsdp, True, *RUN, '--fsdp', '--workers=auto'), torchrun=2))
        ddp = str(root / 'ddp')
        r = run_train(tiny_flags(data, ddp, True, *RUN, '--kill_at_step=5'), torchrun=2)
        assert r.returncode != 0 and os.path.isfile(os.path.join(ddp, 'ar-ckpt-last.pth'))
        yield dict(root=root, data=data, fsdp=fsdp, ddp=ddp, env=mp)


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_writes_sharded_checkpoints(runs):
    fsdp, ddp = runs['fsdp'], runs['ddp']
    got, logs = _mean_losses(fsdp)
    want, ddp_logs = _mean_losses(ddp)
    assert sorted(got) == list(range(1, STEPS + 1))
    _close(got, want, range(1, 6))
    for s in range(1, 6):   # the same S-JFB draws, lr and update decisions
        assert [(g[s]['n'], g[s]['m'], g[s]['lr'], g[s]['stepped']) for g in logs] == \
               [(d[s]['n'], d[s]['m'], d[s]['lr'], d[s]['stepped']) for d in ddp_logs]
    log = open(os.path.join(fsdp, 'log.txt')).read()
    # a real 2-rank shard holds what the arithmetic says
    line = [ln for ln in log.splitlines() if '[fsdp]' in ln][0]
    held, arith = line.split('holds ')[1].split(' (arithmetic: ')
    assert [int(t.split()[1]) for t in held.split(', ')] == [int(t.strip(')')) for t in arith.split(', ')]
    assert 'loader worker(s) per rank (auto: min(8,' in log
    assert '13 images' in _val_loss(fsdp)[1]
    # the newest two folders stay, each complete; the step-2 one was removed
    assert [s for s, _ in sharded_ckpt.folders(fsdp)] == [6, 4]
    assert not os.path.exists(os.path.join(fsdp, 'ar-ckpt-last.pth'))
    marker, md = sharded_ckpt.check_folder(os.path.join(fsdp, sharded_ckpt.folder_name(6)))
    assert marker['world_size'] == 2 and {'__0_0.distcp', '__1_0.distcp'} <= set(marker['files'])
    # the slim export is one ordinary state dict, gathered on rank 0: the weights of the last folder
    from utils.model_io import load_models
    vae, var, spec = load_models(os.path.join(fsdp, 'viar-slim.pth'))
    into = {'model': var.state_dict(), 'ema': {k: torch.zeros_like(v) for k, v in var.state_dict().items()}}
    dist.dcp_load(into, os.path.join(fsdp, sharded_ckpt.folder_name(6)), md)
    from utils.checkpoint import read_checkpoint
    slim = read_checkpoint(os.path.join(fsdp, 'viar-slim.pth'))
    for k, v in slim['model'].items():
        assert not dist.is_sharded(v) and torch.equal(v, into['model'][k]), k
    for k, v in slim['model_ema'].items():
        assert torch.equal(v, into['ema'][k].to(v.dtype)), k
    _, var_st, _ = load_models(os.path.join(fsdp, 'viar-slim.safetensors'))
    assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), var_st.state_dict().values()))


@pytest.mark.slow
def test_saved_by_two_ranks_resumed_by_one_and_by_four(runs, tmp_path):
    """The step-6 folder is damaged (a shard missing; the marker missing): refused with the file named, the step-4
    folder used; 1 rank and 4 ranks then give the next steps' losses of the uninterrupted 2-rank run."""
    want, _ = _mean_losses(runs['fsdp'])
    for world, damage in ((1, '__1_0.distcp'), (4, 'complete.json')):
        out = str(tmp_path / f'w{world}')
        shutil.copytree(runs['fsdp'], out)
        os.remove(os.path.join(out, sharded_ckpt.folder_name(6), damage))
        for f in os.listdir(out):
            if f.startswith('steps-rank') or f == 'log.txt':
                os.remove(os.path.join(out, f))
        _ok(run_train(tiny_flags(runs['data'], out, True, *RUN, '--fsdp'), torchrun=world if world > 1 else 0))
        got, logs = _mean_losses(out)
        assert len(logs) == world and sorted(got) == [5, 6]
        _close(got, want, (5, 6))
        log = open(os.path.join(out, 'log.txt')).read()
        assert f'refusing {os.path.join(out, sharded_ckpt.folder_name(6))}: ' in log and damage in log
        assert f'[resume] {os.path.join(out, sharded_ckpt.folder_name(4))}: step 4' in log
        assert ('nothing to shard' in log) == (world == 1)
        assert 'training continues as it would have' in log


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp_and_back(runs, tmp_path):
    want, _ = _mean_losses(runs['fsdp'])
    # DDP -> FSDP: ar-ckpt-last.pth (step 4) resumed on 2 sharded ranks
    ddp = str(tmp_path / 'ddp')
    shutil.copytree(runs['ddp'], ddp)
    _ok(run_train(tiny_flags(runs['data'], ddp, True, *RUN, '--fsdp'), torchrun=2))
    got, _ = _mean_losses(ddp)
    _close(got, want, (5, 6))
    assert f'[resume] {os.path.join(ddp, "ar-ckpt-last.pth")}: step 4' in open(os.path.join(ddp, 'log.txt')).read()
    assert [s for s, _ in sharded_ckpt.folders(ddp)] == [6]
    # FSDP -> DDP: the step-4 folder resumed without --fsdp, which writes ar-ckpt-last.pth again
    back = str(tmp_path / 'back')
    os.makedirs(back)
    shutil.copytree(os.path.join(runs['fsdp'], sharded_ckpt.folder_name(4)),
                    os.path.join(back, sharded_ckpt.folder_name(4)))
    _ok(run_train(tiny_flags(runs['data'], back, True, *RUN), torchrun=2))
    got, _ = _mean_losses(back)
    _close(got, want, (5, 6))
    from utils.checkpoint import read_checkpoint
    assert read_checkpoint(os.path.join(back, 'ar-ckpt-last.pth'))['g_it'] == STEPS
    # a DDP evaluation of the same weights: the sharded one (uneven batches over ranks) counted each image once
    assert _val_loss(back)[0] == pytest.approx(_val_loss(runs['fsdp'])[0], rel=2e-5)


@pytest.mark.slow
def test_fsdp_with_grad_ckpt_and_compile(runs, tmp_path):
    """--grad_ckpt and --compile under --fsdp train the same steps as the plain sharded run (compile: float
    rounding only). Dynamo and AOT autograd trace as in a GPU run (graph breaks at FSDP's hooks, dynamic shapes,
    the backward graphs); torch's backend override swaps inductor's CPU C++ code, which no GPU run uses and which
    took two thirds of this test's time, for the traced ATen graphs."""
    want, _ = _mean_losses(runs['fsdp'])
    out = str(tmp_path / 'cc')
    _ok(run_train(tiny_flags(runs['data'], out, True, *RUN, '--fsdp', '--grad_ckpt', '--compile', '--max_steps=2'),
                  torchrun=2, timeout=600, env={'TORCH_COMPILE_OVERRIDE_BACKENDS': '>=0:aot_eager'}))
    got, _ = _mean_losses(out)
    assert sorted(got) == [1, 2]
    assert got[1] == pytest.approx(want[1], rel=1e-4)   # the first step: same weights, same draws
