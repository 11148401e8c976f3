"""Sampling defaults a file records (`train.py --sample_defaults`): parsed and checked once, written into the
exports, and used by gen_img.py, sampling.py and the app for every flag the user did not type."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.tiny import tiny_spec, tiny_vae_var
from utils.model_io import save_slim, slim_export
from utils.sample.compile_util import SamplingError
from utils.sample.config import SampleConfig, recorded_defaults, with_recorded

DEMO = dict(cfg=0.0, top_k=0, top_p=0.0, iter_left=3, iter_right=2)


def test_the_flag_text_and_a_files_entry_read_alike():
    got = recorded_defaults('cfg=0, top_k=0,top_p=0 ,iter_left=3,iter_right=2')
    assert got == DEMO and type(got['top_k']) is int and type(got['cfg']) is float
    assert recorded_defaults({'cfg': 2, 'top_k': 5}) == {'cfg': 2.0, 'top_k': 5}   # JSON numbers from a file


@pytest.mark.parametrize('text, words', [
    ('top_p=2', 'top_p must be in [0, 1]'), ('cfg=-1', 'cfg must be >= 0'), ('top_k=1.5', 'top_k must be an integer'),
    ('cfg=x', 'cfg must be a number'), ('seed=3', "'seed' is not a sampling default"), ('cfg', 'name=value pairs'),
    ('iter_left=-1', 'iter_left/iter_right must be >= 0')])
def test_a_bad_record_is_one_line_naming_the_value(text, words):
    with pytest.raises(SamplingError, match='^--sample_defaults') as e:
        recorded_defaults(text)
    assert words in str(e.value) and '\n' not in str(e.value)


def test_the_record_fills_the_flags_not_typed_and_typed_flags_win():
    typed_k = SampleConfig(top_k=7, typed=('top_k',))   # as the command line builds it: --top_k 7 typed
    got, line = with_recorded(typed_k, DEMO)
    assert (got.cfg, got.top_k, got.top_p, got.iter_left, got.iter_right) == (0.0, 7, 0.0, 3, 2)
    assert line == ('sampling defaults from the file: cfg 0, top_p 0, iter_left 3, iter_right 2 '
                    '(typed flags override them)')
    plain = SampleConfig(typed=())
    assert with_recorded(plain, None) == (plain, 'sampling defaults: cfg 1.5, top-k 900, top-p 0.96: the official '
                                                 'ImageNet settings (the file records none; type --cfg/--top_k/--top_p '
                                                 'to change)')
    every = SampleConfig(typed=('cfg', 'top_k', 'top_p', 'iter_left', 'iter_right'))
    assert with_recorded(every, DEMO) == (every, '')
    filters = SampleConfig(typed=('cfg', 'top_k', 'top_p'))   # a VAR's record holds only flags the user typed
    assert with_recorded(filters, dict(cfg=0.0, top_k=0, top_p=0.0)) == (filters, '')
    # a config built in Python: what it set counts as typed, and the record's values do not become "typed"
    tau = SampleConfig(tau='0.1', top_k=5)
    got, _ = with_recorded(tau, DEMO)
    assert got.top_k == 5 and got.cfg == 0 and set(got.typed) == {'tau', 'top_k'}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The same tiny VIAR three times: recording the demo-like defaults (.pth and its .safetensors twin), recording
    nothing, and recording a broken entry."""
    root = tmp_path_factory.mktemp('recorded')
    vae, var = tiny_vae_var(True)
    out = {}
    for name, record in (('recorded', DEMO), ('plain', None), ('broken', {'top_p': 3})):
        export = slim_export(var, tiny_spec(True), vae=vae)
        if record:
            export['sampling'] = dict(record)   # written as train.py writes it (slim_export's sample_defaults below)
        save_slim(export, str(root / f'{name}.pth'))
        out[name] = str(root / f'{name}.pth')
    assert slim_export(var, tiny_spec(True), sample_defaults=DEMO)['sampling'] == DEMO
    return out


def gen(path, out_dir, *flags):
    import gen_img
    gen_img.main(['--var_ckpt', path, '--vae_ckpt', '', '--device', 'cpu', '--output_dir', str(out_dir),
                  '--class_label', '1', '--seeds', '0', '1', '--progress', 'False', *map(str, flags)])
    folder = os.path.join(str(out_dir), os.path.splitext(os.path.basename(path))[0])
    return [np.asarray(Image.open(os.path.join(folder, f'class1_seed{s}.png'))) for s in (0, 1)]


def test_gen_img_samples_with_the_files_defaults(files, tmp_path, capsys):
    typed = ['--cfg', 0, '--top_k', 0, '--top_p', 0, '--iter_left', 3, '--iter_right', 2]
    want = gen(files['plain'], tmp_path / 'typed', *typed)
    for path in (files['recorded'], files['recorded'].replace('.pth', '.safetensors')):
        capsys.readouterr()
        got = gen(path, tmp_path / os.path.basename(path))
        out = capsys.readouterr().out
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert 'sampling defaults from the file: cfg 0, top_k 0, top_p 0, iter_left 3, iter_right 2' in out
        assert 'cfg 0, top-k 0, top-p 0; schedule Dec.(3,2): 3,2,2,2 iterations' in out   # the banner shows what is used
    gen(files['plain'], tmp_path / 'plain')
    assert 'sampling defaults: cfg 1.5, top-k 900, top-p 0.96: the official ImageNet settings' in capsys.readouterr().out
    typed_over = gen(files['recorded'], tmp_path / 'over', '--cfg', 1.5)   # a typed flag beats the record
    assert not all(np.array_equal(a, b) for a, b in zip(typed_over, want))


def test_a_broken_record_is_one_line(files, tmp_path):
    with pytest.raises(SystemExit) as e:
        gen(files['broken'], tmp_path)
    assert str(e.value) == (f"error: {files['broken']}'s recorded sampling defaults: top_p must be in [0, 1] (0 = no "
                            f"nucleus filtering), got 3.0; type the sampling flags instead, or re-export the file")


def test_sampling_py_plans_its_images_with_the_files_defaults(files, tmp_path):
    """The plan a resumed run must match (cfg, top-k, top-p, iterations) is the one the same flags typed give."""
    import sampling

    def plan(path, where, *flags):
        sampling.main(['--ckpt_path', path, '--vae_ckpt', '', '--num_classes', '2', '--per_class', '1',
                       '--batch_size', '2', '--device', 'cpu', '--dtype', 'fp32', '--progress', 'False',
                       '--sample_dir', str(tmp_path / where), *map(str, flags)])
        (folder,) = [d for d in os.listdir(tmp_path / where) if os.path.isdir(tmp_path / where / d)]
        with open(tmp_path / where / folder / sampling.SETTINGS_FILE) as f:
            return folder, {k: v for k, v in json.load(f).items() if k != 'var_ckpt'}

    folder, got = plan(files['recorded'], 'recorded')
    typed_folder, want = plan(files['plain'], 'typed', '--cfg', 0, '--top_k', 0, '--top_p', 0, '--iter_left', 3,
                              '--iter_right', 2)
    assert got == want and (got['cfg'], got['top_k'], got['top_p']) == (0.0, 0, 0.0)
    assert folder.endswith('-cfg-0.0-seed-1') and typed_folder.endswith('-cfg-0.0-seed-1')   # named by the cfg used


def test_train_refuses_a_bad_record_before_it_starts():
    from utils.train.args import derive, parse_args
    args = parse_args(['--depth', '2', '--sample_defaults', 'top_k=-3'])
    with pytest.raises(SystemExit, match=r'^--sample_defaults: top_k must be >= 0'):
        derive(args, 1)
    good = parse_args(['--depth', '2', '--sample_defaults', 'cfg=0,iter_left=4'])
    assert derive(good, 1).sample_defaults == dict(cfg=0.0, iter_left=4)


def test_the_app_page_starts_from_the_record(files):
    from utils.app import loading
    from utils.model_io import load_or_build
    from utils.sample.config import ModelSource
    models = [loading.serve_model('m', load_or_build(ModelSource(var_ckpt=p, vae_ckpt=''), 'cpu'), SampleConfig())
              for p in (files['plain'], files['recorded'])]
    page = loading.page_sample_defaults(models, demo=dict(cfg=2.0))
    assert (page.cfg, page.top_k, page.top_p, page.iter_left, page.iter_right) == (0.0, 0, 0.0, 3, 2)
    assert loading.page_sample_defaults(models[:1], demo=dict(cfg=2.0)).cfg == 2.0   # an older demo folder
