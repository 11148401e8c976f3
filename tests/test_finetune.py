"""Fine-tuning: train.py --init_ckpt, --init_from_var (VIAR from VAR), --freeze, and their bad inputs.

The pure pieces (class rows, the VAR -> VIAR block map, freeze patterns, the resolution refusal) first, then
tiny runs of train.Run checking what the model holds before its first step.
"""
import os

import pytest
import torch

import train
from models.config import var_to_viar_names
from models.layout import PYRAMIDS
from tests.train_helpers import make_image_folder, read_steps, tiny_flags
from utils.checkpoint import save_atomic
from utils.train import init_ckpt as ic
from utils.train.lr_control import param_groups


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize('n_file,n_run', [(5, 3), (2, 1), (3, 10)])
def test_new_class_count_takes_fresh_class_rows_and_keeps_the_learned_null_row(n_file, n_run):
    g = torch.Generator().manual_seed(0)
    file_W, init_W = torch.randn(n_file + 1, 8, generator=g), torch.randn(n_run + 1, 8, generator=g)
    out = ic.adapt_class_emb(file_W, init_W)
    assert out.shape == init_W.shape
    assert torch.equal(out[:n_run], init_W[:n_run])    # class rows: this run's fresh init
    assert torch.equal(out[n_run], file_W[n_file])     # null class (CFG's unconditional row): the file's
    assert ic.adapt_class_emb(file_W, torch.zeros_like(file_W)) is file_W   # same count: the file as it is


def test_var_to_viar_block_map():
    keys = ['pre_blocks.0.attn.mat_qkv.weight', 'pre_blocks.1.ffn.fc1.bias', 'implicit_block.attn.proj.weight',
            'post_blocks.0.ada_lin.1.weight', 'post_blocks.1.ada_lin.1.weight', 'implicit_block_projection.0.weight',
            'class_emb.weight', 'head.weight', 'pos_1LC']
    m = var_to_viar_names(keys, var_depth=7, pre_depth=2, post_depth=2)
    assert m == {'pre_blocks.0.attn.mat_qkv.weight': 'blocks.0.attn.mat_qkv.weight',
                 'pre_blocks.1.ffn.fc1.bias': 'blocks.1.ffn.fc1.bias',
                 'implicit_block.attn.proj.weight': 'blocks.3.attn.proj.weight',        # 7 // 2
                 'post_blocks.0.ada_lin.1.weight': 'blocks.5.ada_lin.1.weight',        # the last two: 5, 6
                 'post_blocks.1.ada_lin.1.weight': 'blocks.6.ada_lin.1.weight',
                 'implicit_block_projection.0.weight': None,                            # keeps its fresh init
                 'class_emb.weight': 'class_emb.weight', 'head.weight': 'head.weight', 'pos_1LC': 'pos_1LC'}
    # the official VIAR-d30 from VAR-d30: implicit <- block 15, post <- 25..29
    m30 = var_to_viar_names(['implicit_block.x', 'post_blocks.4.x', 'post_blocks.0.x'], 30, 5, 5)
    assert m30 == {'implicit_block.x': 'blocks.15.x', 'post_blocks.4.x': 'blocks.29.x', 'post_blocks.0.x': 'blocks.25.x'}
    with pytest.raises(ValueError, match='need a VAR of depth >= 6'):
        var_to_viar_names(keys, 5, 3, 3)


def test_freeze_patterns_apply_in_order_with_exceptions():
    names = ['pre_blocks.0.w', 'implicit_block.attn.w', 'implicit_block.ffn.w', 'class_emb.weight', 'head.weight']
    assert ic.freeze_mask(names, ['*', '!implicit_block.*', '!class_emb.*']) == {
        'pre_blocks.0.w': True, 'implicit_block.attn.w': False, 'implicit_block.ffn.w': False,
        'class_emb.weight': False, 'head.weight': True}
    assert ic.freeze_mask(names, ['implicit_block.*', '!implicit_block.ffn.*'])['implicit_block.ffn.w'] is False
    with pytest.raises(ValueError, match="'blocks.*' matches no parameter"):
        ic.freeze_mask(names, ['blocks.*'])
    assert ic.parse_patterns(' *, !class_emb.* ,,') == ['*', '!class_emb.*']


def test_a_file_of_another_resolution_is_refused_without_interpolation():
    sd = {'pos_1LC': torch.zeros(1, 680, 8), 'lvl_embed.weight': torch.zeros(10, 8)}
    msg = ic.resolution_mismatch(sd, PYRAMIDS[512], 'var_d16.pth')
    assert 'var_d16.pth was trained on the 256 px pyramid (--pn 256: 680 tokens)' in msg
    assert 'this run trains the 512 px pyramid (--pn 512: 2240 tokens)' in msg and 'not interpolated' in msg
    assert ic.resolution_mismatch(sd, PYRAMIDS[256], 'x') is None
    assert '--pn 1_2_3 (14 tokens)' in ic.resolution_mismatch(
        {'pos_1LC': torch.zeros(1, 30, 8), 'lvl_embed.weight': torch.zeros(4, 8)}, (1, 2, 3), 'x')


def test_param_groups_refuse_frozen_parameters_unless_freezing():
    from tests.tiny import tiny_vae_var
    _, var = tiny_vae_var(True)
    var.head.requires_grad_(False)
    with pytest.raises(ValueError, match='expects every parameter trainable'):   # the official behaviour, kept
        param_groups(var)
    names, params, groups = param_groups(var, allow_frozen=True)
    assert 'head.weight' not in names and all(p.requires_grad for p in params)
    assert sum(len(g['params']) for g in groups) == len(params) == sum(1 for p in var.parameters() if p.requires_grad)


# ---------------------------------------------------------------- runs

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('ft')
    return {n: make_image_folder(str(root / f'c{n}'), classes=n, per_class=4, val_per_class=1) for n in (1, 2, 3)}


@pytest.fixture(scope='module')
def trained(folders, tmp_path_factory):
    """Output folders of a 2-class tiny VAR after 2 real steps (ar-ckpt-last.pth, var-slim.pth) and of a VIAR
    (only its var-slim.pth, written directly)."""
    from models.config import ModelSpec
    from utils.model_io import slim_export
    d = str(tmp_path_factory.mktemp('var'))
    train.main(tiny_flags(folders[2], d, False, '--max_steps=2', '--depth=5'))
    v = str(tmp_path_factory.mktemp('viar'))
    spec = ModelSpec(depth=5, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                     patch_nums=(1, 2, 3, 4), V=32, Cvae=8, vae_ch=32, vae_ch_mult=(1, 2, 4), vae_num_res_blocks=1,
                     num_classes=2)
    vae, viar = spec.build('cpu')
    save_atomic(slim_export(viar, spec, vae=vae), os.path.join(v, 'var-slim.pth'))
    return {'var': d, 'viar': v}


def make_run(flags):
    train.dist.initialize('cpu')
    return train.Run(train.arg_util.parse_args(flags))


def file_sd(path):
    from utils.checkpoint import read_state_dict
    return read_state_dict(path)


@pytest.mark.parametrize('n_run', [3, 1, 2])
@pytest.mark.parametrize('name', ['var-slim.pth', 'ar-ckpt-last.pth'])
def test_init_ckpt_loads_every_weight_and_adapts_the_class_rows(folders, trained, tmp_path, n_run, name):
    """A slim export or a training checkpoint; 3 classes, 1 class (class-conditional on one class) or the same 2."""
    src = os.path.join(trained['var'], name)
    run = make_run(tiny_flags(folders[n_run], str(tmp_path / 'out'), False, '--depth=5', f'--init_ckpt={src}'))
    try:
        got, want = run.var.state_dict(), file_sd(src)
        assert run.prog.g_it == 0 and run.trainer.opt.optimizer.state == {}   # weights only: no step, no moments
        assert [k for k in want if k != 'class_emb.weight' and not torch.equal(got[k], want[k])] == []
        assert got['class_emb.weight'].shape[0] == n_run + 1
        assert torch.equal(got['class_emb.weight'][n_run], want['class_emb.weight'][2])   # the learned null row
        if n_run == 2:
            assert torch.equal(got['class_emb.weight'], want['class_emb.weight'])
        log = open(tmp_path / 'out' / 'log.txt').read()
        assert ('class rows re-initialised' in log) == (n_run != 2)
        assert 'weights only: the optimizer, step and schedule start afresh' in log
    finally:
        run.close()


def test_official_layout_file_initialises_a_fine_tune(folders, trained, tmp_path):
    """A bare state dict (what the official var_d*.pth files are) works the same way."""
    bare = str(tmp_path / 'var_bare.pth')
    save_atomic(file_sd(os.path.join(trained['var'], 'var-slim.pth')), bare)
    run = make_run(tiny_flags(folders[3], str(tmp_path / 'out'), False, '--depth=5', f'--init_ckpt={bare}'))
    try:
        assert torch.equal(run.var.head.weight, file_sd(bare)['head.weight'])
    finally:
        run.close()


def test_a_resume_wins_over_init_ckpt(folders, trained, tmp_path):
    """An output folder holding ar-ckpt-last.pth (a real one, of a run with these flags) resumes from it."""
    import shutil
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(trained['var'], 'ar-ckpt-last.pth'), out / 'ar-ckpt-last.pth')
    saved = file_sd(str(out / 'ar-ckpt-last.pth'))
    other = str(tmp_path / 'other.pth')   # weights that differ from the checkpoint's everywhere
    save_atomic({k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}, other)
    run = make_run(tiny_flags(folders[2], str(out), False, '--depth=5', '--max_steps=6', f'--init_ckpt={other}'))
    try:
        assert run.prog.g_it == 2
        assert all(torch.equal(v, saved[k]) for k, v in run.var.state_dict().items())
        assert not torch.equal(run.var.head.weight, file_sd(other)['head.weight'])
        assert '--init_ckpt/--init_from_var not applied' in open(out / 'log.txt').read()
    finally:
        run.close()


def test_init_from_var_maps_the_blocks_and_keeps_a_fresh_projection(folders, trained, tmp_path):
    src = os.path.join(trained['var'], 'var-slim.pth')
    var_sd = file_sd(src)
    flags = tiny_flags(folders[2], str(tmp_path / 'a'), True, '--depth=5')
    fresh = make_run(flags)   # what the same flags build without it: the projection must stay this
    try:
        fresh_sd = {k: v.clone() for k, v in fresh.var.state_dict().items()}
    finally:
        fresh.close()
    run = make_run(tiny_flags(folders[2], str(tmp_path / 'b'), True, '--depth=5', f'--init_from_var={src}'))
    try:
        sd = run.var.state_dict()
        for k, v in sd.items():
            if k.startswith('implicit_block_projection.'):
                assert torch.equal(v, fresh_sd[k]), k
            elif k.startswith('pre_blocks.0.'):
                assert torch.equal(v, var_sd['blocks.0.' + k[len('pre_blocks.0.'):]]), k
            elif k.startswith('implicit_block.'):
                assert torch.equal(v, var_sd['blocks.2.' + k[len('implicit_block.'):]]), k   # 5 // 2
            elif k.startswith('post_blocks.0.'):
                assert torch.equal(v, var_sd['blocks.4.' + k[len('post_blocks.0.'):]]), k    # the last block
            else:
                assert torch.equal(v, var_sd[k]), k
        assert 'implicit_block <- blocks.2' in open(tmp_path / 'b' / 'log.txt').read()
    finally:
        run.close()


def test_freeze_trains_only_what_it_leaves_out_and_counts_it(folders, tmp_path):
    out = str(tmp_path / 'out')
    pattern = '*,!implicit_block.*,!class_emb.*'
    run = make_run(tiny_flags(folders[2], out, True, '--max_steps=3', f'--freeze={pattern}'))
    try:
        before = {k: v.clone() for k, v in run.var.state_dict().items()}
        trained_n = sum(p.numel() for p in run.var.parameters() if p.requires_grad)
        run.train()
        after = run.var.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.startswith(('implicit_block.', 'class_emb.')) for k in changed)
        assert any(k.startswith('implicit_block.') for k in changed)
    finally:
        run.close()
    log = open(os.path.join(out, 'log.txt')).read()
    assert f'[freeze] training {trained_n / 1e6:.3f}M of ' in log and 'class_emb, implicit_block' in log
    # a resume must freeze the same parameters (the optimizer state belongs to them)
    with pytest.raises(SystemExit, match=r"--freeze \*,!implicit_block.\*,!class_emb.\* \(now \)"):
        train.main(tiny_flags(folders[2], out, True, '--max_steps=4'))


@pytest.mark.parametrize('flags,match', [
    (('--freeze=blocks.*',), r"--freeze pattern 'blocks.\*' matches no parameter; parameter names start with .*"
                             r"implicit_block"),
    (('--freeze=*',), 'freezes every parameter: nothing would be trained'),
])
def test_bad_freeze_is_one_line(folders, tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match) as e:
        train.main(tiny_flags(folders[2], str(tmp_path), True, '--max_steps=1', *flags))
    assert '\n' not in str(e.value)


def test_weights_that_do_not_fit_say_what_the_file_is_and_which_flags_load_it(folders, trained, tmp_path):
    var_slim = os.path.join(trained['var'], 'var-slim.pth')
    viar_slim = os.path.join(trained['viar'], 'var-slim.pth')
    cases = [
        # VAR weights into VIAR flags
        (tiny_flags(folders[2], str(tmp_path / 'a'), True, '--depth=5', f'--init_ckpt={var_slim}'),
         r'is a VAR \(depth 5, width 32, 2 heads, 2 classes\), but these flags build a VIAR .*Train with '
         r'--use_implicit False to fine-tune it\. To start this VIAR from that VAR, pass it as --init_from_var'),
        # another depth and width
        (tiny_flags(folders[2], str(tmp_path / 'b'), False, '--depth=4', '--width=64', f'--init_ckpt={var_slim}'),
         r'Train with --depth 5 --width 32 to fine-tune it'),
        # another resolution
        (tiny_flags(folders[2], str(tmp_path / 'c'), False, '--depth=5', '--pn=1_2_4', f'--init_ckpt={var_slim}'),
         r'was trained on a pyramid of 4 scales and 30 tokens, but this run trains the pyramid --pn 1_2_4 '
         r'\(21 tokens\).*not interpolated'),
        # a VIAR given to --init_from_var, and --init_from_var on a VAR run
        (tiny_flags(folders[2], str(tmp_path / 'd'), True, '--depth=5', f'--init_from_var={viar_slim}'),
         r'is a VIAR checkpoint, not a VAR: pass it as --init_ckpt'),
        (tiny_flags(folders[2], str(tmp_path / 'e'), False, '--depth=5', f'--init_from_var={var_slim}'),
         r'--init_from_var initialises a VIAR: add --use_implicit True'),
        (tiny_flags(folders[2], str(tmp_path / 'f'), True, '--depth=5', f'--init_from_var={var_slim}',
                    f'--init_ckpt={var_slim}'), 'not both'),
        (tiny_flags(folders[2], str(tmp_path / 'g'), True, '--depth=5', '--width=64', f'--init_from_var={var_slim}'),
         r'is a VAR \(depth 5, width 32.*Train with --width 32 to initialise this VIAR from it'),
        (tiny_flags(folders[2], str(tmp_path / 'h'), False, f'--init_ckpt={tmp_path / "missing.pth"}'),
         r'missing.pth.* does not exist'),
    ]
    for flags, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            train.main(flags)
        assert '\n' not in str(e.value), str(e.value)


@pytest.mark.slow
def test_init_errors_are_one_line_without_traceback_from_the_command_line(folders, trained, tmp_path):
    from tests.train_helpers import run_train
    proc = run_train(tiny_flags(folders[2], str(tmp_path), True, '--depth=5',
                                f'--init_ckpt={os.path.join(trained["var"], "var-slim.pth")}'), timeout=300)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'pass it as --init_from_var' in proc.stderr.strip().splitlines()[-1]


def test_a_fine_tune_runs_and_exports_a_model_of_the_new_classes(folders, trained, tmp_path):
    """VIAR from VAR on 3 classes with a frozen body: trains, saves, and the export samples class 2."""
    from utils.model_io import load_models
    out = str(tmp_path / 'out')
    train.main(tiny_flags(folders[3], out, True, '--depth=5', '--max_steps=2', '--freeze=pre_blocks.*,post_blocks.*',
                          f'--init_from_var={os.path.join(trained["var"], "var-slim.pth")}'))
    assert sorted(read_steps(os.path.join(out, 'steps-rank0.jsonl'))) == [1, 2]
    _, var, spec = load_models(os.path.join(out, 'viar-slim.pth'), '')
    assert spec.num_classes == 3 and spec.use_implicit
    img = var.autoregressive_infer_cfg(1, 2, g_seed=0, top_k=0, top_p=0.0, iter_left=2, iter_right=2)
    assert img.shape == (1, 3, 16, 16)
