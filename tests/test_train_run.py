"""train.py end to end on CPU: torchrun x2 (VAR and VIAR), kill and resume, non-finite steps, bad input."""
import os
import shutil

import pytest
import torch

import train
from tests.hooked_train import FaultHooks
from tests.hooked_train import main as hooked_main
from tests.tiny import tiny_vae_var
from tests.train_helpers import make_image_folder, read_steps, run_train, suggested_argv, tiny_flags
from utils.train.amp_opt import AmpOptimizer, build_adamw
from utils.train.lr_control import param_groups
import numpy as np
import gen_img
from models.vqvae import VQVAE
from tests.train_helpers import make_image_folder, tiny_flags
from utils.checkpoint import save_atomic


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imgs')))


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('implicit', [True, False])
def test_torchrun_two_ranks_train_with_identical_jfb_draws(data, tmp_path, implicit):
    out = str(tmp_path / 'out')
    # VIAR: both ranks are SIGKILLed after step 13; torchrun restarts them and they resume from step 12
    crash = ('--kill_at_step=13', '--save_every_steps=4') if implicit else ()
    _ok(run_train(tiny_flags(data, out, implicit, '--ep=12', '--save_freq=6', *crash), torchrun=2,
                  restarts=1 if implicit else 0))
    log = open(os.path.join(out, 'log.txt')).read()
    assert ('[resume]' in log and 'step 12 (ep 6, it 0)' in log) == implicit
    r0, r1 = read_steps(f'{out}/steps-rank0.jsonl'), read_steps(f'{out}/steps-rank1.jsonl')
    assert sorted(r0) == sorted(r1) == list(range(1, 25))
    assert [(r0[s]['n'], r0[s]['m']) for s in r0] == [(r1[s]['n'], r1[s]['m']) for s in r0]
    if implicit:
        assert len({(r['n'], r['m']) for r in r0.values()}) > 3 and all(1 <= r['m'] <= 3 for r in r0.values())
    for r in (r0, r1):   # each rank's loss on its own half of the (overfittable) set falls clearly
        first, last = sum(r[s]['loss'] for s in range(1, 5)) / 4, sum(r[s]['loss'] for s in range(21, 25)) / 4
        assert last < first - 0.5
    slim = 'viar-slim.pth' if implicit else 'var-slim.pth'
    for name in ('ar-ckpt-last.pth', 'ar-ckpt-best.pth', slim, 'log.txt'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert any(n.startswith('tb-') for n in os.listdir(out))
    # the slim export rebuilds the trained model for the sampling scripts
    from utils.model_io import load_models
    _, var, spec = load_models(os.path.join(out, slim), '')
    assert spec.use_implicit == implicit and spec.embed_dim == 32
    ck = torch.load(os.path.join(out, 'ar-ckpt-last.pth'), map_location='cpu', weights_only=False)
    assert ck['g_it'] == 24 and len(ck['rng']) == 2
    assert torch.equal(var.head.weight, ck['trainer']['var_wo_ddp']['head.weight'])


@pytest.mark.slow
def test_sigkill_then_restart_continues_exactly(data, tmp_path):
    extra = ('--ep=4', '--save_every_steps=3', '--ema=0.9')
    ref, out = str(tmp_path / 'ref'), str(tmp_path / 'out')
    _ok(run_train(tiny_flags(data, ref, True, *extra)))
    killed = run_train(tiny_flags(data, out, True, *extra, '--kill_at_step=5'))
    assert killed.returncode == -9
    assert '[ckpt] after step 3' in open(os.path.join(out, 'log.txt')).read()   # saved after 3 steps, killed after 5
    # a half-written temp file from a kill during a save must not matter
    open(os.path.join(out, '.ar-ckpt-last.pth.crash.tmp'), 'wb').write(b'partial')
    _ok(run_train(tiny_flags(data, out, True, *extra)))
    a, b = read_steps(f'{ref}/steps-rank0.jsonl'), read_steps(f'{out}/steps-rank0.jsonl')
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:   # steps 3.. ran twice in `out`; the resumed values equal the uninterrupted ones
        assert (a[s]['loss'], a[s]['n'], a[s]['m']) == (b[s]['loss'], b[s]['n'], b[s]['m']), s
    ca = torch.load(f'{ref}/ar-ckpt-last.pth', map_location='cpu', weights_only=False)['trainer']
    cb = torch.load(f'{out}/ar-ckpt-last.pth', map_location='cpu', weights_only=False)['trainer']
    for k, v in ca['var_wo_ddp'].items():
        assert torch.equal(v, cb['var_wo_ddp'][k]), k
    for k, v in ca['ema']['shadow'].items():
        assert torch.equal(v, cb['ema']['shadow'][k]), k


@pytest.mark.slow
def test_resume_with_other_model_flags_is_refused(data, tmp_path):
    out = str(tmp_path / 'out')
    train.main(tiny_flags(data, out, False, '--max_steps=2', '--save_every_steps=2'))
    with pytest.raises(SystemExit, match=r'--depth 5 \(.*ar-ckpt-last.pth: 4\): resuming keeps the architecture') as e:
        train.main(tiny_flags(data, out, False, '--max_steps=4', '--depth=5'))
    train.main(suggested_argv(str(e.value)))   # the command the refusal suggests resumes the run
    assert sorted(read_steps(os.path.join(out, 'steps-rank0.jsonl'))) == [1, 2, 3, 4]
    open(os.path.join(out, 'ar-ckpt-last.pth'), 'wb').write(b'garbage')
    with pytest.raises(SystemExit, match='cannot read .*ar-ckpt-last.pth to resume'):
        train.main(tiny_flags(data, out, False, '--max_steps=4'))


# ---------------------------------------------------------------- non-finite steps

def test_non_finite_loss_skips_the_update():
    vae, var = tiny_vae_var(True)
    var.train()
    from trainer import VARTrainer
    _, params, groups = param_groups(var)
    tr = VARTrainer(vae, var, var, AmpOptimizer(build_adamw(groups, 1e-2, torch.device('cpu')), params),
                    hooks=FaultHooks(nan_steps=(1,)))
    img, label = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in var.state_dict().items()}
    st = tr.train_step(img, label, g_it=0, stepping=True)   # step 1: poisoned by the test hook
    assert not st.loss_finite and not st.stepped
    assert all(torch.equal(v, var.state_dict()[k]) for k, v in before.items())
    st = tr.train_step(img, label, g_it=1, stepping=True)
    assert st.loss_finite and st.stepped and not torch.equal(before['head.weight'], var.head.weight)


def test_run_stops_after_too_many_non_finite_steps(data, tmp_path):
    out = str(tmp_path / 'out')
    flags = tiny_flags(data, out, True, '--max_steps=10', '--save_every_steps=1', '--nan_at_steps=3-10',
                       '--max_nonfinite=3')
    with pytest.raises(SystemExit, match='stopped at step 5: 3 non-finite losses/gradients in a row') as e:
        hooked_main(flags)
    assert '\n' not in str(e.value)
    steps = read_steps(f'{out}/steps-rank0.jsonl')
    assert [steps[s]['stepped'] for s in range(1, 6)] == [True, True, False, False, False]
    # skipped steps leave the weights alone, so saving after them is safe; the stop itself saves nothing
    ck = torch.load(f'{out}/ar-ckpt-last.pth', map_location='cpu', weights_only=False)
    assert ck['g_it'] == 4 and ck['nonfinite'] == 2


def test_a_single_non_finite_step_is_skipped_and_training_goes_on(data, tmp_path):
    out = str(tmp_path / 'out')
    hooked_main(tiny_flags(data, out, False, '--max_steps=4', '--nan_at_steps=2'))
    steps = read_steps(f'{out}/steps-rank0.jsonl')
    assert [steps[s]['stepped'] for s in range(1, 5)] == [True, False, True, True]


def test_non_finite_weights_are_never_saved(data, tmp_path):
    out = str(tmp_path / 'out')
    args = train.arg_util.parse_args(tiny_flags(data, out, False, '--max_steps=2'))
    train.dist.initialize('cpu')
    run = train.Run(args)
    try:
        with torch.no_grad():
            run.var.head.weight[0, 0] = float('nan')
        with pytest.raises(SystemExit, match='weights became non-finite by step 0; not saving them'):
            run._save(best=True)
        assert not os.path.exists(os.path.join(out, 'ar-ckpt-last.pth'))
    finally:
        run.close()


# ---------------------------------------------------------------- bad input

@pytest.mark.slow
def test_missing_data_path_is_one_line_without_traceback(tmp_path):
    proc = run_train(['--device=cpu', f'--local_out_dir_path={tmp_path}'], timeout=120)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('please pass --data_path=')


def _break(root, how):
    if how == 'missing':
        shutil.rmtree(root)
    elif how == 'no_classes':
        for split in ('train', 'val'):
            for c in os.listdir(os.path.join(root, split)):
                shutil.rmtree(os.path.join(root, split, c))
    elif how == 'empty_class':
        os.makedirs(os.path.join(root, 'train', 'class9'))
    elif how == 'no_val':
        shutil.rmtree(os.path.join(root, 'val'))


@pytest.mark.parametrize('how,match', [
    ('missing', 'is not a folder: pass a folder with one subfolder of images per class'),
    ('no_classes', 'has no class subfolders'),
    ('empty_class', 'class folder .*class9 holds no image'),
])
def test_bad_data_folders_are_clear_errors(tmp_path, how, match):
    root = make_image_folder(str(tmp_path / 'imgs'), per_class=2, val_per_class=1)
    _break(root, how)
    with pytest.raises(SystemExit, match=match) as e:
        train.main(tiny_flags(root, str(tmp_path / 'out'), False, '--bs=2', '--max_steps=1'))
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('layout', ['train_only', 'class_folders'])
def test_a_folder_without_val_holds_out_images_of_each_class_for_validation(tmp_path, layout):
    """train/ alone, or the class folders themselves: 5% of each class (at least one) validates, never trains."""
    import shutil
    from utils.data.datasets import build_datasets, held_out
    root = make_image_folder(str(tmp_path / 'imgs'), per_class=8, val_per_class=1)
    shutil.rmtree(os.path.join(root, 'val'))
    if layout == 'class_folders':
        for c in os.listdir(os.path.join(root, 'train')):
            shutil.move(os.path.join(root, 'train', c), os.path.join(root, c))
        os.rmdir(os.path.join(root, 'train'))
    classes, train_set, val_set = build_datasets(root, 16, 16)
    assert classes == ['class0', 'class1'] and len(train_set) == 14 and len(val_set) == 2
    assert sorted(t for _, t in val_set.samples) == [0, 1]   # one of each class
    assert not {p for p, _ in val_set.samples} & {p for p, _ in train_set.base.samples}
    assert held_out([0] * 40 + [1] * 3 + [2]) == held_out([0] * 40 + [1] * 3 + [2])   # the same on every run
    assert [len([i for i in held_out([0] * 40 + [1] * 3 + [2]) if lo <= i < hi]) for lo, hi in
            ((0, 40), (40, 43), (43, 44))] == [2, 1, 0]
    out = str(tmp_path / 'out')
    train.main(tiny_flags(root, out, False, '--bs=2', '--max_steps=1'))
    assert '[data] train 14 / val 2 images (no val/ folder: 5% of each class held out of training), 2 classes' in \
        open(os.path.join(out, 'log.txt')).read()


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_folder(str(tmp_path / 'imgs'), per_class=2, val_per_class=1)
    bad = os.path.join(root, 'train', 'class1', 'broken.png')
    open(bad, 'wb').write(b'not a png')
    with pytest.raises(SystemExit, match='cannot read image .*broken.png') as e:
        train.main(tiny_flags(root, str(tmp_path / 'out'), False, '--bs=5', '--max_steps=1'))
    assert '\n' not in str(e.value)


def test_batch_that_cannot_split_over_ranks_is_a_clear_error(data, tmp_path):
    with pytest.raises(SystemExit, match='--bs 9 cannot be split over 1 rank\\(s\\) x 2 accumulation'):
        train.main(tiny_flags(data, str(tmp_path / 'out'), False, '--bs=9', '--ac=2'))


TINY_TOKENIZER = dict(vocab_size=32, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4), ch_mult=(1, 2, 4),
                      num_res_blocks=1)   # the tokenizer of tests/train_helpers.tiny_flags


@pytest.fixture(scope='module')
def trained_with_a_tokenizer_file(tmp_path_factory):
    """A tiny VIAR trained 2 steps with --vae_ckpt pointing at a tokenizer file (as the demo does)."""
    root = tmp_path_factory.mktemp('run')
    data = make_image_folder(str(root / 'imgs'))
    torch.manual_seed(3)
    vae = VQVAE(test_mode=True, **TINY_TOKENIZER)
    vae_path = str(root / 'tokenizer.pth')
    save_atomic({'model': vae.state_dict()}, vae_path)
    out = str(root / 'out')
    train.main(tiny_flags(data, out, True, '--max_steps=2', f'--vae_ckpt={vae_path}'))
    return os.path.join(out, 'viar-slim.pth'), vae_path


def _gen(tmp_path, *argv):
    return gen_img.main(['--device', 'cpu', '--output_dir', str(tmp_path), '--top_k', '0', '--top_p', '0',
                         '--progress', 'False', *map(str, argv)])


def test_slim_export_embeds_the_tokenizer_the_run_trained_with(trained_with_a_tokenizer_file, tmp_path,
                                                                 monkeypatch):
    slim, vae_path = trained_with_a_tokenizer_file
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)   # no ckpts/ here: the official tokenizer cannot be what it loads
    own = _gen(tmp_path / 'own', '--var_ckpt', slim, '--class_label', 1, '--seeds', 0, '--iters', '2,2,2,2')
    given = _gen(tmp_path / 'given', '--var_ckpt', slim, '--vae_ckpt', vae_path, '--class_label', 1, '--seeds', 0,
                 '--iters', '2,2,2,2')
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(own[0])), np.asarray(Image.open(given[0])))
