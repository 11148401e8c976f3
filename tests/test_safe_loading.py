"""Loading a checkpoint never runs code: weights-only loads everywhere, hostile files refused at every
entry point, safetensors exports, pinned official digests, DCP metadata, upload limits for images."""
import argparse
import dataclasses
import io
import os
import pickle
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image as PImage
import pytest
import torch

from models.config import ModelSpec
from tests.tiny import tiny_spec, tiny_vae_var
from utils import checkpoint as ck
from utils.checkpoint import (CheckpointError, OfficialDigestError, UnsafeCheckpointError, load_var_weights,
                              read_checkpoint, read_dcp_metadata, save_atomic, sha256_of)
from utils.model_io import load_models, safetensors_twin, save_slim, slim_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = tiny_spec(True)


# ---------------------------------------------------------------- hostile files

class OpensMarker:
    """Unpickling this calls open(marker, 'w'): the file appears iff the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


class RunsShell:
    """Unpickling this runs a shell command that creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def hostile(path, marker, payload=OpensMarker, raw: bool = False) -> str:
    """A checkpoint-looking file (real weights + a payload); torch.save's zip, or a bare pickle stream."""
    obj = {'model': {'w': torch.ones(2)}, 'config': payload(marker)}
    if raw:
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, str(path))
    return str(path)


def assert_refused(message: str, path: str, marker):
    """The one-line refusal: names the file, says it asks to run code and was not loaded, names the converter."""
    assert '\n' not in message, message
    assert str(path) in message and 'asks to run code' in message and 'was not loaded' in message, message
    assert 'scripts/convert_checkpoint.py' in message and '--i_trust_this_file' in message, message
    assert not os.path.exists(marker), 'the pickle ran code'


@pytest.mark.parametrize('payload', [OpensMarker, RunsShell])
@pytest.mark.parametrize('raw', [False, True])
def test_hostile_file_is_refused_and_full_unpickling_would_have_run_it(tmp_path, payload, raw):
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil.pth', marker, payload, raw)
    for mmap in (False, True):
        with pytest.raises(UnsafeCheckpointError) as e:
            read_checkpoint(path, mmap=mmap)
        assert_refused(str(e.value), path, marker)
    # the control: the same file under full unpickling does run its code (so the test above can fail)
    if raw:
        with open(path, 'rb') as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_damaged_files_are_not_called_hostile(tmp_path):
    save_atomic({'w': torch.ones(3)}, tmp_path / 'ok.pth')
    data = (tmp_path / 'ok.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    for name, says in (('cut.pth', 'truncated'), ('text.pth', 'is a text file')):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(tmp_path / name))
        assert not isinstance(e.value, UnsafeCheckpointError) and says in str(e.value)
        assert '\n' not in str(e.value)


def test_numpy_arrays_are_data_but_a_callable_inside_one_is_refused(tmp_path):
    good = str(tmp_path / 'np.pth')
    torch.save({'key': np.arange(5, dtype=np.uint32), 'f': np.linspace(0, 1, 3)}, good)
    got = read_checkpoint(good)
    assert np.array_equal(got['key'], np.arange(5)) and got['key'].dtype == np.uint32
    marker = tmp_path / 'marker'
    bad = str(tmp_path / 'np_obj.pth')
    torch.save({'arr': np.array([OpensMarker(marker), 1], dtype=object)}, bad)
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(bad)
    assert_refused(str(e.value), bad, marker)


def test_numpy_1x_array_paths_load(tmp_path):
    """numpy 1.x pickled arrays through numpy.core.multiarray; a legacy-format file written that way loads."""
    buf = io.BytesIO()
    torch.save({'rng': np.random.RandomState(3).get_state()}, buf, _use_new_zipfile_serialization=False,
               pickle_protocol=2)
    data = buf.getvalue()
    assert b'numpy._core.multiarray\n_reconstruct' in data
    path = tmp_path / 'np1.pth'
    path.write_bytes(data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'))
    got = read_checkpoint(str(path))
    assert np.array_equal(got['rng'][1], np.random.RandomState(3).get_state()[1])


# ---------------------------------------------------------------- every entry point refuses

@pytest.fixture(scope='module')
def slim(tmp_path_factory):
    """A tiny VIAR slim export (config + embedded tokenizer + EMA), written as .pth and .safetensors twins."""
    vae, var = tiny_vae_var(True)
    ema = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in var.state_dict().items()}
    path = str(tmp_path_factory.mktemp('slim') / 'tiny_viar.pth')
    save_slim(slim_export(var, SPEC, vae=vae, var_ema_sd=ema), path)
    return path


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    from tests.train_helpers import make_image_folder
    return make_image_folder(str(tmp_path_factory.mktemp('data')), classes=2, per_class=8, val_per_class=2, size=16)


FAST = ['--device', 'cpu', '--top_k', '0', '--top_p', '0', '--iter_left', '2', '--iter_right', '2',
        '--progress', 'False']


def test_gen_img_var_ckpt_refuses(tmp_path):
    import gen_img
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil.pth', marker)
    with pytest.raises(SystemExit) as e:
        gen_img.main(['--var_ckpt', path, '--output_dir', str(tmp_path / 'out'), *FAST])
    assert_refused(str(e.value), path, marker)


def test_gen_img_vae_ckpt_refuses(tmp_path, slim):
    import gen_img
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil_vae.pth', marker, RunsShell)
    with pytest.raises(SystemExit) as e:
        gen_img.main(['--var_ckpt', slim, '--vae_ckpt', path, '--output_dir', str(tmp_path / 'out'), *FAST])
    assert_refused(str(e.value), path, marker)


def test_sampling_refuses(tmp_path):
    import sampling
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil.pth', marker)
    with pytest.raises(SystemExit) as e:
        sampling.main(['--ckpt_path', path, '--vae_ckpt', '', '--num_classes', '1', '--per_class', '1',
                       '--batch_size', '1', '--sample_dir', str(tmp_path / 's'), *FAST])
    assert_refused(str(e.value), path, marker)


def test_convergence_script_refuses(tmp_path):
    from scripts import convergence
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil.pth', marker, RunsShell)
    with pytest.raises(SystemExit) as e:
        convergence.main(['--var_ckpt', path, '--device', 'cpu', '--out_dir', str(tmp_path / 'o')])
    assert_refused(str(e.value), path, marker)


def test_web_app_refuses_a_hostile_checkpoint(tmp_path):
    """app.py --var_ckpt evil.pth: nothing served, the page's error is the one-line refusal, no code ran."""
    from utils.app import loading
    from utils.sample.config import ModelSource, SampleConfig
    marker = tmp_path / 'marker'
    path = hostile(tmp_path / 'evil.pth', marker, RunsShell)
    models, errors = loading.load_app_models([('model', ModelSource(var_ckpt=path, device='cpu'))], SampleConfig())
    assert models == [] and len(errors) == 1
    assert_refused(errors[0], path, marker)


def test_training_resume_refuses(tmp_path, image_folder):
    import train
    from tests.train_helpers import tiny_flags
    marker = tmp_path / 'marker'
    out = tmp_path / 'run'
    out.mkdir()
    path = hostile(out / 'ar-ckpt-last.pth', marker)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(image_folder, str(out), True, '--max_steps=2'))
    assert_refused(str(e.value), path, marker)


def test_tokenizer_resume_refuses(tmp_path, image_folder):
    from train_tokenizer import main as train_tokenizer_main
    marker = tmp_path / 'marker'
    out = tmp_path / 'vae'
    out.mkdir()
    path = hostile(out / 'vae-ckpt-last.pth', marker, RunsShell)
    with pytest.raises(SystemExit) as e:
        train_tokenizer_main(['--data_path', image_folder, '--out_dir', str(out), '--reso', '8', '--patch_nums',
                              '1,2,4', '--ch_mult', '1,2', '--num_res_blocks', '1', '--ch', '32', '--V', '16',
                              '--Cvae', '4', '--bs', '4', '--max_steps', '2', '--tensorboard', 'False'])
    assert_refused(str(e.value), path, marker)
    from utils.train.tokenizer_trainer import load_tokenizer
    with pytest.raises(UnsafeCheckpointError):
        load_tokenizer(path)
    assert not marker.exists()


def _entry_point_argv(script: str, tmp_path, image_folder):
    """(the hostile file's path, argv) that makes `script` read it: a checkpoint flag, or a resume file in the
    output folder."""
    from tests.train_helpers import tiny_flags
    if script in ('gen_img.py', 'sampling.py', 'scripts/convergence.py'):
        path = str(tmp_path / 'evil.pth')
        extra = {'gen_img.py': ['--var_ckpt', path, '--output_dir', str(tmp_path / 'out'), *FAST],
                 'sampling.py': ['--ckpt_path', path, '--vae_ckpt', '', '--num_classes', '1', '--per_class', '1',
                                 '--batch_size', '1', '--sample_dir', str(tmp_path / 's'), *FAST],
                 'scripts/convergence.py': ['--var_ckpt', path, '--device', 'cpu', '--out_dir', str(tmp_path / 'o')]}
        return path, extra[script]
    out = tmp_path / 'run'
    out.mkdir()
    if script == 'train.py':
        return str(out / 'ar-ckpt-last.pth'), tiny_flags(image_folder, str(out), True, '--max_steps=2')
    return str(out / 'vae-ckpt-last.pth'), ['--data_path', image_folder, '--out_dir', str(out), '--reso', '8',
                                            '--patch_nums', '1,2,4', '--ch_mult', '1,2', '--num_res_blocks', '1',
                                            '--ch', '32', '--V', '16', '--Cvae', '4', '--bs', '4', '--max_steps', '2',
                                            '--tensorboard', 'False']


@pytest.mark.slow
@pytest.mark.parametrize('script', ['gen_img.py', 'sampling.py', 'scripts/convergence.py', 'train.py',
                                    'train_tokenizer.py'])
def test_command_line_prints_one_line_and_exits(script, tmp_path, image_folder):
    """Each entry point, as a user runs it, given a file that asks to run code: exit code 1, exactly one line on
    stderr (the refusal), no traceback, and the payload never ran."""
    marker = tmp_path / 'marker'
    path, argv = _entry_point_argv(script, tmp_path, image_folder)
    hostile(path, marker, RunsShell)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert_refused(lines[0], path, marker)


# ---------------------------------------------------------------- what the project writes loads weights-only

def strict_load(path: str):
    """torch.load with weights_only=True and nothing allow-listed: new files need nothing beyond plain data."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow
def test_training_outputs_load_weights_only_and_a_resume_continues_exactly(tmp_path, image_folder):
    import train
    from tests.train_helpers import read_steps, tiny_flags
    from trainer import StepHooks

    class StopAfter2(StepHooks):
        def after_step(self, step):
            if step == 2:
                raise SystemExit('stopped after step 2')

    ref, run = tmp_path / 'ref', tmp_path / 'run'
    flags = ('--max_steps=4', '--save_every_steps=2', '--ema=0.9')
    train.main(tiny_flags(image_folder, str(ref), True, *flags))
    with pytest.raises(SystemExit, match='stopped after step 2'):
        train.main(tiny_flags(image_folder, str(run), True, *flags), hooks=StopAfter2())
    for name in ('ar-ckpt-last.pth', 'viar-slim.pth'):
        strict_load(str(run / name))
    ck = strict_load(str(run / 'ar-ckpt-last.pth'))
    assert ck['g_it'] == 2
    rng = ck['rng'][0]['numpy']
    assert isinstance(rng, dict) and isinstance(rng['key'], torch.Tensor) and rng['key'].shape == (624,)
    assert set(ck['trainer']) >= {'var_wo_ddp', 'var_opt', 'ema'}
    slim_twin = read_checkpoint(safetensors_twin(str(run / 'viar-slim.pth')))
    assert set(slim_twin) == {'model', 'model_ema', 'config', 'vae', 'class_names'}
    train.main(tiny_flags(image_folder, str(run), True, *flags))   # resumes from the weights-only state
    a, b = read_steps(str(ref / 'steps-rank0.jsonl')), read_steps(str(run / 'steps-rank0.jsonl'))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        assert (a[s]['loss'], a[s]['n'], a[s]['m']) == (b[s]['loss'], b[s]['n'], b[s]['m']), s
    assert '[resume]' in (run / 'log.txt').read_text()
    wa = strict_load(str(ref / 'ar-ckpt-last.pth'))['trainer']['var_wo_ddp']
    wb = strict_load(str(run / 'ar-ckpt-last.pth'))['trainer']['var_wo_ddp']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_numpy_rng_round_trips_through_plain_data():
    import train
    np.random.seed(123)
    np.random.standard_normal()   # leaves a cached gaussian in the state
    plain = train.numpy_rng_to_plain(np.random.get_state())
    expect = np.random.random(4)
    np.random.seed(0)
    np.random.set_state(train.numpy_rng_from_plain(plain))
    assert np.array_equal(np.random.random(4), expect)


def test_resume_reads_with_mmap_and_weights_only(tmp_path, monkeypatch):
    import train
    save_atomic({'g_it': 3, 'w': torch.ones(2)}, tmp_path / 'ar-ckpt-last.pth')
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    got = train.read_resume(str(tmp_path / 'ar-ckpt-last.pth'))
    assert got['g_it'] == 3 and seen and seen[0]['mmap'] is True and seen[0]['weights_only'] is True


@pytest.mark.slow
def test_tokenizer_files_load_weights_only(tmp_path, image_folder):
    from utils.train.tokenizer_trainer import EXPORT, LAST_CKPT, TokenizerConfig, load_tokenizer, train_tokenizer
    cfg = TokenizerConfig(data_path=image_folder, out_dir=str(tmp_path), reso=8, patch_nums=(1, 2, 4),
                          ch_mult=(1, 2), num_res_blocks=1, ch=32, V=16, Cvae=4, bs=4, max_steps=2,
                          tensorboard=False, log_every=1, mid_reso=1.0)
    train_tokenizer(cfg)
    for name in (LAST_CKPT, EXPORT):
        obj = strict_load(str(tmp_path / name))
        assert isinstance(obj['model'], dict)
    vae, arch = load_tokenizer(str(tmp_path / EXPORT))
    assert arch['V'] == 16


# ---------------------------------------------------------------- safetensors

def test_safetensors_twin_holds_the_same_export(slim):
    a, b = read_checkpoint(slim), read_checkpoint(safetensors_twin(slim))
    assert set(a) == set(b) == {'model', 'model_ema', 'vae', 'config'}
    for part in ('model', 'model_ema', 'vae'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert a[part][k].dtype == b[part][k].dtype and torch.equal(a[part][k], b[part][k]), (part, k)
    assert ModelSpec.from_dict(b['config']) == SPEC
    _, var_ema, spec = load_models(safetensors_twin(slim), ema=True)
    assert spec == SPEC and torch.equal(var_ema.state_dict()['head.weight'], a['model_ema']['head.weight'])


def test_safetensors_export_samples_the_same_images_as_its_pth_twin(slim, tmp_path):
    import gen_img
    argv = ['--class_label', '3', '--seeds', '0', '4', *FAST]
    pth = gen_img.main(['--var_ckpt', slim, '--output_dir', str(tmp_path / 'pth'), *argv])
    sft = gen_img.main(['--var_ckpt', safetensors_twin(slim), '--output_dir', str(tmp_path / 'sft'), *argv])
    assert [os.path.basename(p) for p in pth] == [os.path.basename(p) for p in sft] and len(pth) == 3
    for p, s in zip(pth, sft):
        a, b = np.asarray(PImage.open(p)), np.asarray(PImage.open(s))
        assert a.std() > 0 and np.array_equal(a, b), p


def test_safetensors_writes_tensors_that_share_storage_and_reads_foreign_files(tmp_path):
    from safetensors.torch import save_file
    from utils.safetensors_io import read_safetensors, write_safetensors
    base = torch.arange(12.).reshape(3, 4)
    write_safetensors({'model': {'a': base, 'tied': base, 'view': base[1]}, 'step': 3}, str(tmp_path / 's.safetensors'))
    got = read_safetensors(str(tmp_path / 's.safetensors'))
    assert got['step'] == 3 and torch.equal(got['model']['tied'], base) and torch.equal(got['model']['view'], base[1])
    # a bare state dict written by another tool (an official file converted elsewhere) loads into the model
    _, var = tiny_vae_var(True, seed=4)
    save_file({k: v.contiguous() for k, v in var.state_dict().items()}, str(tmp_path / 'bare.safetensors'))
    _, fresh = tiny_vae_var(True, seed=9)
    load_var_weights(fresh, str(tmp_path / 'bare.safetensors'))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), var.state_dict().values()))
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'bare.safetensors').read_bytes()[:100])
    with pytest.raises(CheckpointError, match='truncated'):
        read_checkpoint(str(tmp_path / 'cut.safetensors'))


# ---------------------------------------------------------------- official-format files

def test_official_format_state_dicts_load_weights_only(tmp_path):
    """Official files are flat state dicts (the official code loads them with torch 2.7's weights-only default);
    a nested training layout, extra entries or wrapper prefixes load as well, without pickled objects."""
    vae, var = tiny_vae_var(True, seed=2)
    layouts = {
        'flat.pth': var.state_dict(),
        'nested.pth': {'epoch': 3, 'iter': 0, 'args': {'depth': 4, 'tblr': 8e-5},
                       'trainer': {'var_wo_ddp': var.state_dict(), 'var_opt': {'optimizer': {'state': {}}}}},
        'extra.pth': {'model': var.state_dict(), 'note': 'exported', 'metrics': [1.0, 2.0]},
        'wrapped.pth': {f'module._orig_mod.{k}': v for k, v in var.state_dict().items()},
    }
    for name, obj in layouts.items():
        torch.save(obj, str(tmp_path / name))
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / name)) == []
        _, fresh = tiny_vae_var(True, seed=7)
        load_var_weights(fresh, str(tmp_path / name))
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), var.state_dict().values())), name


# ---------------------------------------------------------------- the converter

def convert(*argv):
    from scripts import convert_checkpoint
    return convert_checkpoint.main(list(map(str, argv)))


def test_convert_official_pth_to_safetensors(tmp_path):
    vae, var = tiny_vae_var(False, seed=3)
    torch.save(var.state_dict(), str(tmp_path / 'var_d4.pth'))
    torch.save(vae.state_dict(), str(tmp_path / 'vae.pth'))
    convert(tmp_path / 'var_d4.pth', tmp_path / 'var_d4.safetensors')
    convert(tmp_path / 'vae.pth', tmp_path / 'vae.safetensors')
    spec = dataclasses.replace(SPEC, use_implicit=False)
    _, got, _ = load_models(str(tmp_path / 'var_d4.safetensors'), str(tmp_path / 'vae.safetensors'), spec)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), var.state_dict().values()))


def test_convert_an_old_file_only_when_trusted(tmp_path):
    _, var = tiny_vae_var(True)
    old = {'model': var.state_dict(), 'config': SPEC, 'args': argparse.Namespace(tblr=8e-5, depth=4),
           'rng': [{'numpy': np.random.RandomState(5).get_state(), 'python': (3, (1, 2), None)}],
           'metrics': {'loss': np.float32(1.5)}}
    src = str(tmp_path / 'old.pth')
    torch.save(old, src)
    with pytest.raises(UnsafeCheckpointError, match='ModelSpec'):
        read_checkpoint(src)
    with pytest.raises(SystemExit) as e:
        convert(src, tmp_path / 'new.pth')
    assert_refused(str(e.value), src, tmp_path / 'no-marker')
    assert not (tmp_path / 'new.pth').exists()
    convert(src, tmp_path / 'new.pth', '--i_trust_this_file')
    new = strict_load(str(tmp_path / 'new.pth'))
    assert new['config'] == dataclasses.asdict(SPEC) and new['args'] == {'tblr': 8e-5, 'depth': 4}
    assert new['metrics']['loss'] == 1.5 and type(new['metrics']['loss']) is float
    key = new['rng'][0]['numpy'][1]   # numpy's MT19937 key array, as a tensor
    assert isinstance(key, torch.Tensor) and np.array_equal(key.numpy(), np.random.RandomState(5).get_state()[1])
    assert all(torch.equal(new['model'][k], v) for k, v in var.state_dict().items())
    # weights + config also fit a .safetensors file; a training state does not, and the message says what to do
    torch.save({'model': var.state_dict(), 'config': SPEC}, str(tmp_path / 'old_slim.pth'))
    convert(tmp_path / 'old_slim.pth', tmp_path / 'slim.safetensors', '--i_trust_this_file')
    _, got, spec = load_models(str(tmp_path / 'slim.safetensors'), 'random')
    assert spec == SPEC and all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                                   var.state_dict().values()))
    with pytest.raises(SystemExit, match=r'new2\.pth, which also loads weights-only'):
        convert(tmp_path / 'new.pth', tmp_path / 'new2.safetensors')


def test_convert_bad_arguments_are_one_line(tmp_path):
    save_atomic({'w': torch.ones(1)}, tmp_path / 'a.pth')
    (tmp_path / 'file').write_text('x')
    for argv, match in [((tmp_path / 'missing.pth', tmp_path / 'o.pth'), 'does not exist'),
                        ((tmp_path / 'a.pth', tmp_path / 'o.bin'), 'must end in'),
                        ((tmp_path / 'a.pth', tmp_path / 'file' / 'o.pth'), 'cannot write')]:
        with pytest.raises(SystemExit, match=match) as e:
            convert(*argv)
        assert '\n' not in str(e.value)


# ---------------------------------------------------------------- pinned digests of the official files

def test_official_digests_are_pinned_for_the_var_files():
    assert set(ck.OFFICIAL_FILES) <= set(ck.OFFICIAL_SHA256)   # a new official name needs a decision here
    for name in ('vae_ch160v4096z32.pth', 'var_d16.pth', 'var_d20.pth', 'var_d24.pth', 'var_d30.pth'):
        digest = ck.OFFICIAL_SHA256[name]
        assert isinstance(digest, str) and len(digest) == 64 and int(digest, 16) >= 0, name


def test_a_file_in_the_download_folder_is_checked_against_its_digest(tmp_path, monkeypatch):
    good = tmp_path / 'viar.pth'
    good.write_bytes(b'the official bytes')
    monkeypatch.setitem(ck.OFFICIAL_SHA256, 'viar.pth', sha256_of(str(good)))
    assert ck.resolve_checkpoint('viar.pth', ckpt_dir=str(tmp_path)) == str(good)
    good.write_bytes(b'other bytes')
    for asked in ('viar.pth', str(good)):
        with pytest.raises(OfficialDigestError) as e:
            ck.resolve_checkpoint(asked, ckpt_dir=str(tmp_path))
        assert 'sha256 differs' in str(e.value) and '\n' not in str(e.value)
        assert 'huggingface.co/mobiushy/VIAR/resolve/main/viar.pth' in str(e.value)
    # the same name elsewhere is the user's own file (a fine-tune): not checked
    own = tmp_path / 'mine'
    own.mkdir()
    (own / 'viar.pth').write_bytes(b'my fine-tune')
    assert ck.resolve_checkpoint(str(own / 'viar.pth'), ckpt_dir=str(tmp_path)) == str(own / 'viar.pth')


def test_a_wrong_official_tokenizer_in_ckpts_is_refused_by_its_real_digest(tmp_path):
    (tmp_path / 'vae_ch160v4096z32.pth').write_bytes(b'not the tokenizer')
    with pytest.raises(OfficialDigestError, match='7c3ec27ae28a'):
        ck.resolve_checkpoint('vae_ch160v4096z32.pth', ckpt_dir=str(tmp_path))


# ---------------------------------------------------------------- sharded checkpoints: DCP's .metadata

def test_dcp_metadata_reads_without_full_unpickling(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    sd = {'model': {'w': torch.randn(3, 4), 'b': torch.zeros(4, dtype=torch.bfloat16)}, 'step': 7,
          'rng': torch.get_rng_state()}
    dcp.save(sd, checkpoint_id=str(tmp_path / 'ck'), no_dist=True)
    got = read_dcp_metadata(str(tmp_path / 'ck' / '.metadata'))
    want = FileSystemReader(str(tmp_path / 'ck')).read_metadata()
    assert got.state_dict_metadata == want.state_dict_metadata and got.storage_data == want.storage_data
    assert set(got.state_dict_metadata) == {'model.w', 'model.b', 'step', 'rng'}


def test_hostile_or_damaged_dcp_metadata(tmp_path):
    marker = tmp_path / 'marker'
    for i, payload in enumerate((OpensMarker(marker), RunsShell(marker))):
        path = tmp_path / f'{i}.metadata'
        path.write_bytes(pickle.dumps({'state_dict_metadata': payload}))
        with pytest.raises(UnsafeCheckpointError, match='asks to run code'):
            read_dcp_metadata(str(path))
    # a name the allowed module merely imports is not one of its classes
    (tmp_path / 'enum.metadata').write_bytes(b'\x80\x02ctorch.distributed.checkpoint.metadata\nEnum\nq\x00.')
    with pytest.raises(UnsafeCheckpointError, match='Enum'):
        read_dcp_metadata(str(tmp_path / 'enum.metadata'))
    assert not marker.exists()
    (tmp_path / 'cut.metadata').write_bytes(pickle.dumps({'a': [1, 2, 3]})[:-5])
    with pytest.raises(CheckpointError) as e:
        read_dcp_metadata(str(tmp_path / 'cut.metadata'))
    assert not isinstance(e.value, UnsafeCheckpointError)


# ---------------------------------------------------------------- image uploads

def png_claiming(path, width: int, height: int):
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    buf = io.BytesIO()
    PImage.new('L', (1, 1)).save(buf, format='PNG')
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8   # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = width.to_bytes(4, 'big') + height.to_bytes(4, 'big')
    data[ihdr + 13:ihdr + 17] = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])).to_bytes(4, 'big')
    path.write_bytes(bytes(data))
    return str(path)


def test_upload_limits(tmp_path, monkeypatch):
    from utils.sample import image_io
    from utils.sample.image_io import ImageInputError, load_image, load_mask
    ok = tmp_path / 'ok.png'
    PImage.new('RGB', (image_io.MAX_IMAGE_SIDE, 2), (200, 10, 10)).save(ok)
    img, wh = load_image(str(ok), 8)
    assert wh == (image_io.MAX_IMAGE_SIDE, 2) and img.shape == (1, 3, 8, 8)
    wide = tmp_path / 'wide.png'
    PImage.new('RGB', (image_io.MAX_IMAGE_SIDE + 1, 2)).save(wide)
    with pytest.raises(ImageInputError, match='4097x2 pixels'):
        load_image(str(wide), 8)
    bomb = png_claiming(tmp_path / 'bomb.png', 8000, 8000)   # refused on the header, before any decoding
    with pytest.raises(ImageInputError, match='8000x8000 pixels'):
        load_image(bomb, 8)
    with pytest.raises(ImageInputError, match='8000x8000 pixels'):
        load_mask(bomb, 8, (8000, 8000))
    huge = png_claiming(tmp_path / 'huge.png', 100_000, 100_000)   # Pillow's own guard stops this one at open
    with pytest.raises(ImageInputError, match='too many pixels'):
        load_image(huge, 8)
    big = tmp_path / 'big.png'
    big.write_bytes(ok.read_bytes() + b'\0' * (image_io.MAX_IMAGE_BYTES + 1))
    with pytest.raises(ImageInputError, match='MiB'):
        load_image(str(big), 8)
    # Pillow's own decompression-bomb check is an error, not a warning
    monkeypatch.setattr(PImage, 'MAX_IMAGE_PIXELS', 100)
    small = tmp_path / 'small.png'
    PImage.new('RGB', (12, 12)).save(small)
    with pytest.raises(ImageInputError, match='too many pixels'):
        load_image(str(small), 8)
