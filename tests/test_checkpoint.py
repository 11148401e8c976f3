"""Checkpoint helper: strict round trip, atomic writes, and a clear message for every wrong file."""
import os

import pytest
import torch

from models.config import spec_from_state_dict, state_dict_kind
from utils.checkpoint import (CheckpointError, load_vae_weights, load_var_weights, resolve_checkpoint, save_atomic,
                              unwrap_model)
from tests.tiny import tiny_vae_var
from tests.tiny import tiny_spec, tiny_vae_var
from utils.checkpoint import CheckpointError, save_atomic
from utils.model_io import load_models, slim_export


def test_strict_round_trip(tmp_path):
    vae, var = tiny_vae_var(True, seed=1)
    _, other = tiny_vae_var(True, seed=2)
    save_atomic(var.state_dict(), tmp_path / 'viar.pth')
    load_var_weights(other, str(tmp_path / 'viar.pth'))
    for (k, a), b in zip(var.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    save_atomic(vae.state_dict(), tmp_path / 'vae.pth')
    load_vae_weights(vae, str(tmp_path / 'vae.pth'))


def test_training_and_slim_layouts_and_wrappers_load(tmp_path):
    _, var = tiny_vae_var(False, seed=1)
    _, other = tiny_vae_var(False, seed=2)
    sd = {'module.' + k: v for k, v in var.state_dict().items()}
    save_atomic({'trainer': {'var_wo_ddp': sd}, 'arg': {}}, tmp_path / 'ar-ckpt-last.pth')
    load_var_weights(other, str(tmp_path / 'ar-ckpt-last.pth'))
    assert torch.equal(other.head.weight, var.head.weight)
    save_atomic({'model': var.state_dict(), 'config': {}}, tmp_path / 'slim.pth')
    load_var_weights(other, str(tmp_path / 'slim.pth'))

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    assert unwrap_model(Wrap(Wrap(var))) is var


def test_describe_official_style_files():
    _, viar = tiny_vae_var(True, depth=6, width=64 * 6, heads=6, pre=2, post=1)
    info = spec_from_state_dict(viar.state_dict())
    assert info.kind == 'VIAR' and info.depth == 6 and info.pre_depth == 2 and info.post_depth == 1
    vae, var = tiny_vae_var(False, depth=3)
    assert spec_from_state_dict(var.state_dict()).kind == 'VAR'
    assert spec_from_state_dict(var.state_dict()).depth == 3
    assert state_dict_kind(vae.state_dict()) == 'vae'


def test_wrong_files_say_what_they_are(tmp_path):
    vae, var = tiny_vae_var(False, depth=4)
    _, viar = tiny_vae_var(True, depth=4)
    _, var6 = tiny_vae_var(False, depth=6)
    save_atomic(var.state_dict(), tmp_path / 'var.pth')
    save_atomic(vae.state_dict(), tmp_path / 'vae.pth')
    with pytest.raises(CheckpointError, match=r'is a VAR checkpoint \(depth 4.*--use_implicit False'):
        load_var_weights(viar, str(tmp_path / 'var.pth'))           # VAR file with --use_implicit
    with pytest.raises(CheckpointError, match=r'depth 4.*model built is a VAR checkpoint \(depth 6.*--depth 4'):
        load_var_weights(var6, str(tmp_path / 'var.pth'))           # another depth
    with pytest.raises(CheckpointError, match='VQVAE tokenizer file.*--vae_ckpt'):
        load_var_weights(var, str(tmp_path / 'vae.pth'))            # VAE file as the VAR file
    with pytest.raises(CheckpointError, match='not a VQVAE tokenizer'):
        load_vae_weights(vae, str(tmp_path / 'var.pth'))            # VAR file as the VAE file
    data = open(tmp_path / 'var.pth', 'rb').read()
    open(tmp_path / 'cut.pth', 'wb').write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_var_weights(var, str(tmp_path / 'cut.pth'))            # truncated file
    with pytest.raises(CheckpointError, match='does not exist'):
        load_var_weights(var, str(tmp_path / 'nope.pth'))


def test_official_name_offline_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(CheckpointError, match='huggingface.co/mobiushy/VIAR/resolve/main/viar.pth'):
        resolve_checkpoint('viar.pth', ckpt_dir=str(tmp_path))
    (tmp_path / 'viar.pth').write_bytes(b'x')
    assert resolve_checkpoint('viar.pth', ckpt_dir=str(tmp_path)) == os.path.join(str(tmp_path), 'viar.pth')


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'ck.pth'
    save_atomic({'a': torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError('killed mid-write')
    with pytest.raises(RuntimeError):
        save_atomic({'a': Boom()}, path)
    assert torch.equal(torch.load(path)['a'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['ck.pth']


def test_tokenizer_choice_embedded_default_and_empty(tmp_path, monkeypatch):
    """load_models: no --vae_ckpt (None or empty, as in training) uses an export's embedded tokenizer, else the
    official file; random weights only when asked for ('random')."""
    from models.config import ModelSpec
    from utils.model_io import load_models, slim_export
    vae, var = tiny_vae_var(True, seed=5)
    spec = ModelSpec(depth=4, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                     patch_nums=(1, 2, 3, 4), V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1,
                     num_classes=5)
    with_vae, without_vae = str(tmp_path / 'with.pth'), str(tmp_path / 'without.pth')
    save_atomic(slim_export(var, spec, vae=vae), with_vae)
    save_atomic(slim_export(var, spec), without_vae)
    for empty in (None, ''):
        got_vae, _, _ = load_models(with_vae, empty, ModelSpec())
        assert all(torch.equal(a, b) for a, b in zip(got_vae.state_dict().values(), vae.state_dict().values()))
    random_vae, _, _ = load_models(with_vae, 'random', ModelSpec())   # speed benchmarks may ask for one
    assert not torch.equal(random_vae.quantize.embedding.weight, vae.quantize.embedding.weight)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)
    for empty in (None, ''):   # nothing embedded: the official file, fetched when missing
        with pytest.raises(CheckpointError, match='vae_ch160v4096z32.pth'):
            load_models(without_vae, empty, ModelSpec())


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
