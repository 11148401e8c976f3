"""A newcomer's first hour after the demo (issue 14): each sharp edge found by trying it, pinned by a test.

1. a slim export carries the tokenizer it needs (embedded when the run trained its own; the official one
   recorded by name and sha256, a missing one a one-line error at once, no network retries);
2. the benchmark reads a tau JSON on the checkpoint's own scales;
5.-8. banners say what the run does: the model, the classes asked for, the schedule's counts, a scale that
   skips the implicit block, schedule flags that do nothing on a VAR.
(3, 4 and 7 live beside their code: test_sampling's schedule names, test_config's loader hint,
test_sampling_script's settings diff.)
"""
import json
import os

import numpy as np
import pytest
import torch

import gen_img
import train
from models.vqvae import VQVAE
from tests.train_helpers import make_image_folder, tiny_flags
from tests.tiny import tiny_spec, tiny_vae_var, write_tiny_export
from utils.checkpoint import CheckpointError, save_atomic
from utils.model_io import load_models, slim_export

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


def test_a_recorded_official_tokenizer_that_is_missing_fails_at_once_in_one_line(tmp_path, monkeypatch):
    vae, var = tiny_vae_var(True)
    path = str(tmp_path / 'recorded.pth')
    save_atomic(slim_export(var, tiny_spec(), vae_ref=dict(name='vae_ch160v4096z32.pth', sha256='ab' * 32)), path)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')   # as on a machine without internet: no download, no retries
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_models(path)
    msg = str(e.value)
    assert 'records its tokenizer as vae_ch160v4096z32.pth' in msg and '--vae_ckpt' in msg and '\n' not in msg
    # found locally but not the recorded bytes: refused too
    os.makedirs('ckpts')
    save_atomic(vae.state_dict(), 'ckpts/vae_ch160v4096z32.pth')
    with pytest.raises(CheckpointError, match='sha256 differs'):
        load_models(path)


def test_benchmark_reads_a_tau_json_on_the_checkpoints_scales(tmp_path):
    from bench import sample_speed as ss
    from utils.sample.config import parse
    ckpt = write_tiny_export(tmp_path / 'viar4.pth')
    tau = tmp_path / 'convergence.json'
    tau.write_text(json.dumps({'suggested_tau': [0.1, 0.05, 0.02, 0.01]}))
    argv = ['--var_ckpt', ckpt, '--schedules', '4:4,tau=json', '--tau_json', str(tau)]
    _, source, sample = parse(ss.build_parser(), argv, schedule_list=True)
    K, scheds = ss.plan_schedules(source, sample, '4:4,tau=json')
    assert K == 4 and scheds[1]['tau'] == [0.1, 0.05, 0.02, 0.01]
    _, source, sample = parse(ss.build_parser(), argv[2:], schedule_list=True)   # random weights: 10 scales
    with pytest.raises(SystemExit, match='4 tau values but this model has 10 scales'):
        ss.plan_schedules(source, sample, '4:4,tau=json')


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """Tiny VIAR and VAR slim exports that embed their tokenizer."""
    root = tmp_path_factory.mktemp('exports')
    out = {}
    for kind, implicit in (('viar', True), ('var', False)):
        out[kind] = write_tiny_export(root / f'{kind}.pth', implicit)
    return out


def test_banner_says_what_this_run_does(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['viar'], '--class_label', 1, 3, '--seeds', 0, '--iter_left', 4,
         '--iter_right', 1)
    banner = next(l for l in capsys.readouterr().out.splitlines() if 'classes x' in l)
    assert '2 classes x 1 seed = 2 images' in banner                  # asked for, not the model's 5
    assert 'Dec.(4,1): 4,3,2,1 iterations per scale' in banner        # the schedule and its counts


def test_kv_line_says_which_rows_it_counts_and_cfg_0_holds_half(exports, tmp_path, capsys):
    """With guidance the KV caches hold the conditional and unconditional rows; at cfg 0 only the conditional
    ones, half the bytes, and the report line says which."""
    kv = {}
    for cfg in (1.5, 0):
        _gen(tmp_path / str(cfg), '--var_ckpt', exports['viar'], '--class_label', 1, '--seeds', 0, 1, '--cfg', cfg)
        line = next(ln for ln in capsys.readouterr().out.splitlines() if 'KV cache:' in ln)
        kv[cfg] = float(line.split('KV cache: ')[1].split(' MiB')[0])
        assert ('cond + uncond rows' in line) == (cfg != 0) and ('conditional rows only' in line) == (cfg == 0)
    assert kv[0] == pytest.approx(kv[1.5] / 2, abs=0.01)


def test_a_scale_with_zero_iterations_is_said_to_skip_the_implicit_block(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['viar'], '--class_label', 0, '--seeds', 0, '--iter_left', 0,
         '--iter_right', 3)
    out = capsys.readouterr().out
    assert 'Inc.(0,3): 0,1,2,3 iterations per scale; scale 1 skips the implicit block' in out


def test_schedule_flags_on_a_var_checkpoint_warn_and_the_banner_says_var(exports, tmp_path, capsys):
    _gen(tmp_path, '--var_ckpt', exports['var'], '--use_implicit', 'True', '--iter_left', 4, '--iter_right', 4,
         '--class_label', 0, '--seeds', 0)
    out = capsys.readouterr().out
    assert '--use_implicit True (file: False)' in out                 # the file wins, the flag is named
    assert '--iter_left, --iter_right ignored' in out and 'no implicit block' in out
    banner = next(l for l in out.splitlines() if 'classes x' in l or 'class x' in l)
    assert banner.startswith('[gen_img] VAR depth 4') and 'Con.(4,4)' not in banner
