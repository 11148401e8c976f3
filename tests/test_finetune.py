"""Fine-tuning: train.py --init_ckpt, --init_from_var (VIAR from VAR), --freeze, and their bad inputs.

The pure pieces (class rows, the VAR -> VIAR block map, freeze patterns) first, then tiny runs of train.Run
checking what the model holds before its first step: the file sets the architecture and the tokenizer, so these
runs pass no architecture flag (arch=False) and no --vae_ckpt.
"""
import os
import re

import pytest
import torch

import train
from models.config import var_to_viar_names
from tests.train_helpers import make_image_folder, read_steps, suggested_argv, tiny_flags
from utils.checkpoint import read_checkpoint, save_atomic
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
    (only its viar-slim.pth, written directly), and the VAR run's tokenizer as a file of its own."""
    from models.config import ModelSpec
    from utils.model_io import slim_export
    d = str(tmp_path_factory.mktemp('var'))
    train.main(tiny_flags(folders[2], d, False, '--max_steps=2', '--depth=5'))
    v = str(tmp_path_factory.mktemp('viar'))
    spec = ModelSpec(depth=5, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                     patch_nums=(1, 2, 3, 4), V=32, Cvae=8, vae_ch=32, vae_ch_mult=(1, 2, 4), vae_num_res_blocks=1,
                     num_classes=2)
    vae, viar = spec.build('cpu')
    save_atomic(slim_export(viar, spec, vae=vae), os.path.join(v, 'viar-slim.pth'))
    tok = os.path.join(d, 'tokenizer.pth')
    from utils.checkpoint import read_checkpoint
    save_atomic(read_checkpoint(os.path.join(d, 'var-slim.pth'))['vae'], tok)
    return {'var': d, 'viar': v, 'tokenizer': tok}


def make_run(flags):
    train.dist.initialize('cpu')
    return train.Run(train.arg_util.parse_args(flags), flags)


def file_sd(path):
    from utils.checkpoint import read_state_dict
    return read_state_dict(path)


@pytest.mark.parametrize('n_run', [3, 1, 2])
@pytest.mark.parametrize('name', ['var-slim.pth', 'ar-ckpt-last.pth'])
def test_init_ckpt_loads_every_weight_and_adapts_the_class_rows(folders, trained, tmp_path, n_run, name):
    """A slim export or a training checkpoint; 3 classes, 1 class (class-conditional on one class) or the same 2."""
    src = os.path.join(trained['var'], name)
    run = make_run(tiny_flags(folders[n_run], str(tmp_path / 'out'), False, f'--init_ckpt={src}', arch=False,
                              vae_ckpt=''))   # no architecture flag: the file is a depth-5 VAR of 2 classes
    try:
        got, want = run.var.state_dict(), file_sd(src)
        assert run.loop.g_it == 0 and run.trainer.opt.optimizer.state == {}   # weights only: no step, no moments
        assert [k for k in want if k != 'class_emb.weight' and not torch.equal(got[k], want[k])] == []
        assert got['class_emb.weight'].shape[0] == n_run + 1
        assert torch.equal(got['class_emb.weight'][n_run], want['class_emb.weight'][2])   # the learned null row
        if n_run == 2:
            assert torch.equal(got['class_emb.weight'], want['class_emb.weight'])
        assert run.spec.depth == 5 and run.spec.num_classes == n_run   # the file's architecture, the data's classes
        vae_want = read_checkpoint(os.path.join(trained['var'], 'var-slim.pth'))['vae']
        assert all(torch.equal(v, vae_want[k]) for k, v in run.vae.state_dict().items())   # the file's tokenizer
        log = open(tmp_path / 'out' / 'log.txt').read()
        assert ('class rows re-initialised' in log) == (n_run != 2)
        assert 'weights only: the optimizer, step and schedule start afresh' in log
    finally:
        run.close()


def test_official_layout_file_initialises_a_fine_tune(folders, trained, tmp_path):
    """A bare state dict (what the official var_d*.pth files are) works the same way: its weights give the
    architecture and the pyramid, the tokenizer file its own sizes; no architecture flag."""
    bare = str(tmp_path / 'var_bare.pth')
    save_atomic(file_sd(os.path.join(trained['var'], 'var-slim.pth')), bare)
    run = make_run(tiny_flags(folders[3], str(tmp_path / 'out'), False, f'--init_ckpt={bare}', arch=False,
                              vae_ckpt=trained['tokenizer']))
    try:
        assert torch.equal(run.var.head.weight, file_sd(bare)['head.weight'])
        assert (run.spec.depth, run.spec.width, run.spec.patch_nums, run.spec.vae_ch_mult) == (5, 32, (1, 2, 3, 4),
                                                                                                (1, 2, 4))
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
        assert run.loop.g_it == 2
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
    run = make_run(tiny_flags(folders[2], str(tmp_path / 'b'), True, '--p_depth=1', f'--init_from_var={src}',
                              arch=False, vae_ckpt=''))   # the VAR sets the rest
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


def run_suggestions(flags, tries: int = 3):
    """Run train.main on flags; while it refuses with a suggested command, run that; returns the refusals seen.
    A suggestion never repeats the command it answers (no loop), and the last command runs."""
    refusals = []
    for _ in range(tries):
        try:
            train.main(flags)
            return refusals
        except SystemExit as e:
            msg = str(e)
            assert '\n' not in msg, msg
            refusals.append(msg)
            assert 'python train.py ' in msg, msg   # a refusal of a flag says what works instead
            nxt = suggested_argv(msg)
            assert nxt != list(flags), msg
            flags = nxt
    raise AssertionError(f'still refused after {tries} suggestions: {refusals}')


@pytest.mark.parametrize('case,extra,match', [
    ('VAR weights into a VIAR', ['--use_implicit=True'],
     r'--use_implicit True \(.*var-slim.pth: False\).*pass the file as --init_from_var'),
    pytest.param('another depth and width', ['--depth=4', '--width=64'],
                 r'--depth 4 \(.*var-slim.pth: 5\), --width 64 \(.*: 32\): a fine-tune keeps the architecture',
                 marks=pytest.mark.slow),   # a training start each: two cases in the fast tier, all in the suite
    pytest.param('another resolution', ['--pn=1_2_4'], r'--pn 1_2_4 \(.*var-slim.pth: 1_2_3_4\)',
                 marks=pytest.mark.slow),
    pytest.param('another tokenizer size', ['--V=64'], r'--V 64 \(.*: 32\)', marks=pytest.mark.slow),
    pytest.param('a patch size the tokenizer does not have', ['--patch_size=8'], r'--patch_size 8 contradicts',
                 marks=pytest.mark.slow),
    ('a random tokenizer', ['--vae_ckpt=random'], r'--vae_ckpt random contradicts .*which comes with the tokenizer'),
])
def test_a_flag_that_contradicts_the_file_is_named_and_the_suggestion_runs(folders, trained, tmp_path, case, extra,
                                                                           match):
    var_slim = os.path.join(trained['var'], 'var-slim.pth')
    flags = tiny_flags(folders[2], str(tmp_path / 'a'), False, '--max_steps=1', f'--init_ckpt={var_slim}', *extra,
                       arch=False, vae_ckpt='')
    refusals = run_suggestions(flags)
    assert len(refusals) == 1 and re.search(match, refusals[0]), refusals
    assert sorted(read_steps(str(tmp_path / 'a' / 'steps-rank0.jsonl'))) == [1]


def test_init_refusals_say_what_to_pass(folders, trained, tmp_path):
    var_slim = os.path.join(trained['var'], 'var-slim.pth')
    viar_slim = os.path.join(trained['viar'], 'viar-slim.pth')
    cases = [
        (['--p_depth=1', f'--init_from_var={viar_slim}'], r'is a VIAR checkpoint, not a VAR: pass it as --init_ckpt'),
        (['--use_implicit=False', f'--init_from_var={var_slim}'], r'--init_from_var initialises a VIAR'),
        ([f'--init_from_var={var_slim}', f'--init_ckpt={var_slim}'], 'not both'),
        (['--p_depth=1', '--width=64', f'--init_from_var={var_slim}'],
         r'--width 64 \(.*var-slim.pth: 32\): a VIAR started from a VAR keeps the architecture'),
        ([f'--init_ckpt={tmp_path / "missing.pth"}'], r'missing.pth.* does not exist'),
        ([f'--init_ckpt={trained["tokenizer"]}'], r'is a VQVAE tokenizer file; pass it as --vae_ckpt'),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            train.main(tiny_flags(folders[2], str(tmp_path / 'x'), True, *extra, arch=False, vae_ckpt=''))
        assert '\n' not in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / 'x')   # a refused run leaves no output folder behind


@pytest.mark.slow
def test_init_errors_are_one_line_without_traceback_from_the_command_line(folders, trained, tmp_path):
    from tests.train_helpers import run_train
    proc = run_train(tiny_flags(folders[2], str(tmp_path), True, '--use_implicit=True',
                                f'--init_ckpt={os.path.join(trained["var"], "var-slim.pth")}', arch=False, vae_ckpt=''),
                     timeout=300)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'pass the file as --init_from_var' in proc.stderr.strip().splitlines()[-1]


def test_a_fine_tune_runs_and_exports_a_model_of_the_new_classes(folders, trained, tmp_path):
    """VIAR from VAR on 3 classes with a frozen body: trains, saves, and the export samples class 2."""
    from utils.model_io import load_models
    out = str(tmp_path / 'out')
    train.main(tiny_flags(folders[3], out, True, '--p_depth=1', '--max_steps=2', '--freeze=pre_blocks.*,post_blocks.*',
                          f'--init_from_var={os.path.join(trained["var"], "var-slim.pth")}', arch=False, vae_ckpt=''))
    assert sorted(read_steps(os.path.join(out, 'steps-rank0.jsonl'))) == [1, 2]
    _, var, spec = load_models(os.path.join(out, 'viar-slim.pth'), '')
    assert spec.num_classes == 3 and spec.use_implicit
    img = var.autoregressive_infer_cfg(1, 2, g_seed=0, top_k=0, top_p=0.0, iter_left=2, iter_right=2)
    assert img.shape == (1, 3, 16, 16)


def test_a_new_run_never_trains_a_random_tokenizer_unless_asked(folders, tmp_path, monkeypatch):
    """Without --vae_ckpt a new run loads the official tokenizer; where it cannot be had, one line says where to get
    it and no output folder is left; --vae_ckpt random asks for random weights, and the log says so."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'out'
    flags = tiny_flags(folders[2], str(out), False, '--max_steps=1', vae_ckpt='')
    with pytest.raises(SystemExit, match=r'vae_ch160v4096z32.pth.*huggingface.co/FoundationVision/var') as e:
        train.main(flags)
    assert '\n' not in str(e.value) and not out.exists()
    train.main(flags + ['--vae_ckpt=random'])
    assert 'the tokenizer has RANDOM weights (--vae_ckpt random)' in (out / 'log.txt').read_text()


def test_the_file_gives_one_description_of_the_model(folders, tmp_path):
    """A VIAR of depth 6 and width 64 (its weights alone would say depth 1, 64 / 64): a fine-tune builds depth 6 and
    describes it as the sampling tools do."""
    import dataclasses
    import gen_img
    from tests.tiny import tiny_spec
    from utils.arch_flags import describe_model, describe_spec
    from utils.model_io import load_or_build, save_slim, slim_export
    from utils.sample.config import ModelSource, SampleConfig
    spec = dataclasses.replace(tiny_spec(True), depth=6, embed_dim=64, num_heads=2, V=32, vae_ch_mult=(1, 2, 4),
                               num_classes=2)
    vae, var = spec.build()
    path = str(tmp_path / 'viar-slim.pth')
    save_slim(slim_export(var, spec, vae=vae), path)
    run = make_run(tiny_flags(folders[2], str(tmp_path / 'out'), True, f'--init_ckpt={path}', arch=False, vae_ckpt=''))
    try:
        assert run.spec.depth == 6 and describe_model(run.var) == describe_spec(run.spec)
        assert 'VIAR depth 6 (1 pre + implicit + 1 post), width 64' in (tmp_path / 'out' / 'log.txt').read_text()
    finally:
        run.close()
    loaded = load_or_build(ModelSource(var_ckpt=path))
    assert describe_model(loaded.var) == describe_spec(run.spec)
    assert gen_img.banner(loaded.var, [0], [0], SampleConfig(), 'cpu', '').startswith(describe_spec(run.spec))
