"""Hub folders and repo ids wherever a checkpoint is taken (utils.checkpoint.read_model), scripts/export_hf.py, the
model card, and the folder the official VARHF.save_pretrained wrote (tests/data/official_varhf_tiny/).

No network: repo ids resolve through a stand-in for huggingface_hub.snapshot_download that copies a local folder,
offline mode is forced, and uploads go to a fake HfApi.
"""
import json
import os
import shutil

import huggingface_hub
import huggingface_hub.hub_mixin
import numpy as np
import pytest
import torch
from PIL import Image

import models.hub
from scripts import export_hf
from tests.test_official_fixture import FIXTURES, official, robust, sample_with_margins
from tests.tiny import tiny_spec, tiny_vae_var
from utils.checkpoint import CheckpointError, is_hub_source, read_model
from utils.model_io import load_models, load_or_build, save_slim, slim_export
from utils.sample.config import ModelSource, SampleConfig

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
OFFICIAL_FOLDER = os.path.join(DATA, 'official_varhf_tiny')
RECORD = dict(cfg=0.0, top_k=0, top_p=0.0, iter_left=3, iter_right=2)
NAMES = ['ant', 'bee', 'cat', 'dog', 'eel']


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny VIAR slim export recording sampling defaults and class names, and the folder export_hf made of it."""
    root = tmp_path_factory.mktemp('hub')
    vae, var = tiny_vae_var(True)
    slim = str(root / 'viar-slim.pth')
    save_slim(slim_export(var, tiny_spec(True), vae=vae, class_names=NAMES, sample_defaults=RECORD), slim)
    export_hf.main([slim, str(root / 'viar-hub')])
    return slim, str(root / 'viar-hub')


def gen(path, out_dir, *flags):
    """gen_img.py's image of class 1, seed 0, from `path`, with the file's sampling defaults."""
    import gen_img
    gen_img.main(['--var_ckpt', path, '--vae_ckpt', '', '--device', 'cpu', '--output_dir', str(out_dir),
                  '--class_label', '1', '--seeds', '0', '--progress', 'False', *flags])
    folder = os.path.join(str(out_dir), os.path.basename(os.path.normpath(path)).replace('.pth', ''))
    return np.asarray(Image.open(os.path.join(folder, 'class1_seed0.png')))


def test_gen_img_samples_a_folder_as_the_slim_export_it_came_from(exported, tmp_path, capsys):
    slim, folder = exported
    want = gen(slim, tmp_path / 'slim')
    capsys.readouterr()
    got = gen(folder + os.sep, tmp_path / 'hub')   # a trailing slash names the same folder
    out = capsys.readouterr().out
    assert np.array_equal(got, want)
    assert 'sampling defaults from the file: cfg 0, top_k 0, top_p 0, iter_left 3, iter_right 2' in out
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors', 'recorded.json',
                                          'vae.safetensors']


def test_sampling_app_and_init_ckpt_read_a_folder_as_its_export(exported):
    """sampling.py and the app load through load_or_build, train.py --init_ckpt through read_weights."""
    from utils.app.loading import load_app_models, page_sample_defaults
    from utils.train.init_ckpt import read_weights
    slim, folder = exported
    want = load_or_build(ModelSource(var_ckpt=slim, vae_ckpt=''), 'cpu', log=print)
    got = load_or_build(ModelSource(var_ckpt=folder, vae_ckpt=''), 'cpu', log=print)
    assert (got.spec, got.sample_defaults, got.class_names, got.tag) == (want.spec, RECORD, NAMES, 'viar-hub')
    for a, b in ((got.var, want.var), (got.vae, want.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (served,), errors = load_app_models([('model', ModelSource(var_ckpt=folder, vae_ckpt=''))], SampleConfig())
    assert not errors and page_sample_defaults([served]).iter_left == 3
    obj, sd = read_weights(folder)
    assert obj['config'] == tiny_spec(True).to_dict() and sd.keys() == want.var.state_dict().keys()


def test_train_init_ckpt_starts_from_a_folder(exported, tmp_path):
    """train.py --init_ckpt FOLDER: the folder's architecture, weights and tokenizer, with no size flag."""
    import train
    from tests.train_helpers import make_image_folder, tiny_flags
    slim, folder = exported
    data = make_image_folder(str(tmp_path / 'data'), classes=5, per_class=2, val_per_class=1, size=8)
    flags = tiny_flags(data, str(tmp_path / 'out'), True, f'--init_ckpt={folder}', arch=False, vae_ckpt='')
    train.dist.initialize('cpu')
    run = train.Run(train.arg_util.parse_args(flags), flags)
    try:
        want = load_or_build(ModelSource(var_ckpt=slim, vae_ckpt=''), 'cpu', log=print)
        assert run.spec == want.spec
        for got, ref in ((run.var, want.var), (run.vae, want.vae)):
            assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())
        assert f'[init] weights from {folder}' in open(tmp_path / 'out' / 'log.txt').read()
    finally:
        run.close()


def test_a_damaged_folder_is_one_line_and_records_only_their_entries(exported, tmp_path):
    _, folder = exported
    bad = tmp_path / 'bad'
    shutil.copytree(folder, bad)
    (bad / 'recorded.json').write_text(json.dumps({'sampling': RECORD, 'config': {'depth': 99}}))
    assert read_model(str(bad))['config'] == tiny_spec(True).to_dict()   # recorded.json cannot replace the config
    (bad / 'config.json').write_text('{"depth": 4,')
    with pytest.raises(CheckpointError, match=r'config.json is not valid JSON .*; download or export the folder'):
        read_model(str(bad))
    shutil.copy(os.path.join(folder, 'config.json'), bad)
    (bad / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    with pytest.raises(CheckpointError, match=r'model.safetensors cannot be read'):
        read_model(str(bad))


def test_sampling_names_its_folder_after_a_hub_folder_or_repo():
    from sampling import sample_folder_name
    for source in ('hf/viar-hub/', 'you/viar-hub'):   # a shell completes a folder with a slash
        assert sample_folder_name('implicit', source, 1.5, 1) == 'implicit-viar-hub-cfg-1.5-seed-1'


@pytest.mark.parametrize('path, hub', [('someone/var-tiny', True), ('ckpts/var_d16.pth', False),
                                       ('someone/var.pth', False), ('a/b/c', False), ('viar.pth', False)])
def test_which_sources_name_a_hub_repo(path, hub):
    """Official names and checkpoint extensions stay files (official names download as today)."""
    assert is_hub_source(path) is hub


def test_an_existing_local_path_wins_over_a_repo_id(exported, tmp_path, monkeypatch):
    slim, _ = exported
    monkeypatch.chdir(tmp_path)
    os.makedirs('someone')
    shutil.copy(slim, 'someone/var-tiny')   # a file named like a repo id
    assert not is_hub_source('someone/var-tiny') and read_model('someone/var-tiny')['config']


def fake_download(served: dict, calls: list):
    """A snapshot_download that serves repo id -> local folder, copying the allowed files into a cache folder."""
    def download(repo_id, allow_patterns, **kw):
        calls.append((repo_id, sorted(allow_patterns)))
        src = served[repo_id]
        dst = os.path.join(os.path.dirname(src), 'cache', repo_id.replace('/', '--'))
        os.makedirs(dst, exist_ok=True)
        for name in set(os.listdir(src)) & set(allow_patterns):
            shutil.copy(os.path.join(src, name), dst)
        return dst
    return download


def test_a_repo_id_downloads_and_loads(exported, tmp_path, monkeypatch):
    slim, folder = exported
    calls = []
    official_repo = tmp_path / 'var-pth'
    official_repo.mkdir()
    (official_repo / 'var_d16.pth').write_bytes(b'')
    monkeypatch.setattr(models.hub, 'snapshot_download',
                        fake_download({'someone/viar-tiny': folder, 'FoundationVision/var': str(official_repo)}, calls))
    got = load_or_build(ModelSource(var_ckpt='someone/viar-tiny', vae_ckpt=''), 'cpu', log=print)
    want = load_or_build(ModelSource(var_ckpt=slim, vae_ckpt=''), 'cpu', log=print)
    assert got.sample_defaults == RECORD and got.tag == 'viar-tiny'
    assert all(torch.equal(x, y) for x, y in zip(got.var.state_dict().values(), want.var.state_dict().values()))
    assert calls == [('someone/viar-tiny', ['config.json', 'model.safetensors', 'recorded.json', 'vae.safetensors'])]
    with pytest.raises(CheckpointError) as e:   # a repo of .pth files: its files go by their official names
        read_model('FoundationVision/var')
    assert str(e.value).startswith('FoundationVision/var holds no config.json') and 'var_d16.pth' in str(e.value)


def test_a_repo_id_offline_is_one_line_from_gen_img(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(SystemExit) as e:
        gen('someone/no-such-var', tmp_path)
    line = str(e.value)
    assert line.startswith('error: someone/no-such-var: not a local path, and the Hugging Face Hub repo '
                           'someone/no-such-var cannot be fetched (') and '\n' not in line
    assert 'hf download someone/no-such-var --local-dir DIR' in line


def test_model_card_says_what_the_model_is_and_how_to_sample_it(exported):
    _, folder = exported
    card = open(os.path.join(folder, 'README.md')).read()
    params = sum(p.numel() for p in tiny_vae_var(True)[1].parameters())
    for words in ('# VIAR: viar-hub',
                  'VIAR depth 4 (1 pre + implicit + 1 post), width 32, 2 heads, 4 scales, 5 classes',
                  f'parameters: {params:,} (transformer)', 'images: 8x8 px', 'tokenizer: V 48, `vae.safetensors`',
                  'recorded sampling defaults: cfg 0, top_k 0, top_p 0, iter_left 3, iter_right 2',
                  f'.venv/bin/python gen_img.py --var_ckpt {folder} --class_label 0'):
        assert words in card, words
    vae, var = tiny_vae_var(False)   # a model that records nothing: the card names the settings that then apply
    bare = models.hub.model_card(models.hub.hub_model(vae, var, tiny_spec(False)), 'var-hub')
    assert 'recorded sampling defaults: none: the official ImageNet settings apply (cfg 1.5, top-k 900, top-p 0.96)' \
        in bare


class FakeApi:
    """Keeps the README.md of the folder push_to_hub uploads."""
    cards = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kw):
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, **kw):
        FakeApi.cards.append(open(os.path.join(folder_path, 'README.md')).read())
        return f'https://huggingface.co/{repo_id}/commit/0'


def test_export_pushes_a_card_that_names_the_repo(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.hub_mixin, 'HfApi', FakeApi)
    monkeypatch.setattr(FakeApi, 'cards', [])
    export_hf.main([exported[0], str(tmp_path / 'out'), '--push_to_hub', 'someone/viar-tiny'])
    (card,) = FakeApi.cards
    assert '.venv/bin/python gen_img.py --var_ckpt someone/viar-tiny ' in card


def test_export_refuses_what_it_cannot_write(exported, tmp_path, monkeypatch):
    from tests.write_doubles import read_only
    from utils import atomic
    slim, folder = exported
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'notes.txt').write_text('keep')
    with pytest.raises(SystemExit, match=r'exists and is not empty; pass --overwrite'):
        export_hf.main([slim, str(tmp_path / 'full')])
    assert os.listdir(tmp_path / 'full') == ['notes.txt']
    with pytest.raises(SystemExit, match=r'^error: .*config.json is a text file'):
        export_hf.main([os.path.join(folder, 'config.json'), str(tmp_path / 'x')])
    monkeypatch.setattr(atomic, '_new_temp', read_only('*', atomic._new_temp))
    with pytest.raises(SystemExit, match=r'^error: cannot write into .*: read-only file system'):
        export_hf.main([slim, str(tmp_path / 'ro')])
    assert not os.path.exists(tmp_path / 'ro')


def test_export_overwrite_replaces_the_folder_whole(exported, tmp_path):
    slim, _ = exported
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'stale.txt').write_text('old')
    export_hf.main([slim, str(out), '--overwrite'])
    assert 'stale.txt' not in os.listdir(out) and 'model.safetensors' in os.listdir(out)
    assert [n for n in os.listdir(tmp_path) if n != 'out'] == []   # no temporary folder left


@pytest.mark.slow
def test_export_of_a_training_checkpoint_samples_the_same_images(tmp_path):
    import train
    from tests.train_helpers import make_image_folder, tiny_flags
    data = make_image_folder(str(tmp_path / 'data'), classes=2, per_class=4, val_per_class=1)
    run = str(tmp_path / 'run')
    train.main(tiny_flags(data, run, True, '--max_steps=1', '--sample_defaults=cfg=0,top_k=0'))
    ckpt = os.path.join(run, 'ar-ckpt-last.pth')
    export_hf.main([ckpt, str(tmp_path / 'hub')])
    want = gen(ckpt, tmp_path / 'ckpt')
    got = gen(str(tmp_path / 'hub'), tmp_path / 'from-hub')
    assert np.array_equal(got, want)
    assert json.load(open(tmp_path / 'hub' / 'recorded.json'))['sampling'] == dict(cfg=0.0, top_k=0)


def test_the_official_varhf_folder_draws_the_official_fp64_tokens():
    """The folder the official VARHF.save_pretrained wrote: no tokenizer (random here, then the fixture's
    quantizer), every transformer key loaded strictly by the project's loader."""
    assert sorted(os.listdir(OFFICIAL_FOLDER)) == ['README.md', 'config.json', 'model.safetensors']
    vae, var, spec = load_models(OFFICIAL_FOLDER, 'random')
    assert (spec.kind, spec.depth, spec.width, spec.V) == ('VAR', 4, 16, 48)
    vae.quantize.load_state_dict(FIXTURES['tiny']['var']['quant_sd'], strict=True)
    var.cond_drop_rate = 0.0
    vae, var = vae.double(), var.double()
    for sampler in ('greedy', 'topk_topp'):
        want = official('tiny', 'var', torch.float64)['samples'][(sampler, 3, 3)]
        got, _, margins, errors = sample_with_margins(vae, var, FIXTURES['tiny']['meta'], sampler, (3, 3))
        assert all(robust(m, e).all() for m, e in zip(margins, errors))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), sampler


def test_a_repo_id_is_fetched_once_per_node_before_the_ranks_read_it(exported, tmp_path, monkeypatch):
    """train.py's fetch step downloads a Hub repo into the cache on the node's first rank (the others read the
    cache after the barrier); a local folder needs no download."""
    import train
    slim, folder = exported
    calls = []
    monkeypatch.setattr(models.hub, 'snapshot_download', fake_download({'someone/viar-tiny': folder}, calls))
    train.fetch_once_per_node('someone/viar-tiny')
    assert calls == [('someone/viar-tiny', ['config.json', 'model.safetensors', 'recorded.json', 'vae.safetensors'])]
    train.fetch_once_per_node(folder)
    assert len(calls) == 1


def test_export_of_an_official_file_holds_its_weights_and_samples_as_it_does(tmp_path, kind='var'):
    """An official-format transformer file (a bare state dict under the official keys, here the fixture's VAR) and a
    tokenizer file: the folder export_hf writes loads the same weights and samples the same image as the files.
    (The fixture's VIAR is too narrow for a bare state dict: its nominal depth, read from its width as 64 x depth, is
    2, below its pre + post blocks; the official VIAR files are 64 x depth wide.)"""
    from models.vqvae import VQVAE
    s = FIXTURES['tiny']['meta']['sizes']
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, v_patch_nums=tuple(s['patch_nums']))
    vae.quantize.load_state_dict(FIXTURES['tiny'][kind]['quant_sd'], strict=True)
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    torch.save(FIXTURES['tiny'][kind]['var_sd'], tmp_path / f'{kind}.pth')
    export_hf.main([str(tmp_path / f'{kind}.pth'), str(tmp_path / 'hub'), '--vae_ckpt', str(tmp_path / 'vae.pth')])
    got = load_or_build(ModelSource(var_ckpt=str(tmp_path / 'hub'), vae_ckpt=''), 'cpu', log=print)
    want = load_or_build(ModelSource(var_ckpt=str(tmp_path / f'{kind}.pth'), vae_ckpt=str(tmp_path / 'vae.pth')),
                         'cpu', log=print)
    assert got.spec == want.spec and got.spec.use_implicit == (kind == 'viar')
    for a, b in ((got.var, want.var), (got.vae, want.vae)):
        sd_a, sd_b = a.state_dict(), b.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    for m in (got.var, want.var):
        m.cond_drop_rate = 0.0
    images = [m.var.autoregressive_infer_cfg(2, torch.tensor([0, 3]), g_seed=5, cfg=1.5, top_k=8, top_p=0.9)
              for m in (got, want)]
    assert torch.equal(*images)
