"""Hub folders (models/hub.py): round trips, a folder laid out as the official VARHF writes it, push, offline ids.

No network: the official-style folder is written here by hand (config.json with the official keys, model.safetensors
with the official keys of tests/data/official_tiny.pt), the Hub API is a fake, and offline mode is forced.
"""
import json
import os

import huggingface_hub
import huggingface_hub.hub_mixin
import pytest
import safetensors.torch
import torch

from models import VARHF
from models.hub import HubLoadError, VIARHF, hub_model
from tests.test_official_fixture import FIXTURES, official, robust, sample_with_margins
from tests.tiny import tiny_spec, tiny_vae_var

OFFICIAL_VAR_KEYS = {'vae_kwargs', 'num_classes', 'depth', 'embed_dim', 'num_heads', 'mlp_ratio', 'drop_rate',
                     'attn_drop_rate', 'drop_path_rate', 'norm_eps', 'shared_aln', 'cond_drop_rate', 'attn_l2_norm',
                     'patch_nums', 'flash_if_available', 'fused_if_available'}
OFFICIAL_VIAR_KEYS = {'use_implicit', 'pre_depth', 'post_depth', 'implicit_no_grad_min_iters',
                      'implicit_no_grad_max_iters', 'implicit_with_grad_min_iters', 'implicit_with_grad_max_iters'}


def sample(model, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model.autoregressive_infer_cfg(2, torch.tensor([0, 4]), g_seed=seed, cfg=1.5, top_k=10, top_p=0.9)


@pytest.mark.parametrize('use_implicit', [False, True], ids=['var', 'viar'])
def test_round_trip_samples_the_same_images(tmp_path, use_implicit):
    vae, var = tiny_vae_var(use_implicit)
    model = hub_model(vae, var, tiny_spec(use_implicit))
    want = sample(model)
    model.save_pretrained(tmp_path)
    assert {'config.json', 'model.safetensors', 'vae.safetensors'} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / 'config.json').read_text())
    assert set(config) == OFFICIAL_VAR_KEYS | (OFFICIAL_VIAR_KEYS if use_implicit else set())
    assert set(safetensors.torch.load_file(tmp_path / 'model.safetensors')) == set(var.state_dict())

    loaded = VARHF.from_pretrained(tmp_path)
    assert type(loaded) is (VIARHF if use_implicit else VARHF) and loaded.tokenizer_loaded
    assert loaded.use_implicit == use_implicit
    if use_implicit:   # the S-JFB ranges travel under the official implicit_* keys
        assert (loaded.jfb_no_grad, loaded.jfb_with_grad) == (var.jfb_no_grad, var.jfb_with_grad)
    got = sample(loaded)
    assert got.shape == want.shape == (2, 3, 8, 8) and torch.equal(got, want)


def write_official_folder(path, kind: str):
    """A folder as the official VARHF.save_pretrained writes it for the fixture's weights: no tokenizer weights."""
    s = FIXTURES['tiny']['meta']['sizes']
    vae_kwargs = dict(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                      v_patch_nums=list(s['patch_nums']))
    config = dict(vae_kwargs=vae_kwargs, num_classes=s['num_classes'], depth=s['depth'], embed_dim=s['embed_dim'],
                  num_heads=s['num_heads'], mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                  norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True,
                  patch_nums=list(s['patch_nums']), flash_if_available=True, fused_if_available=True)
    if kind == 'viar':
        config.update(use_implicit=True, pre_depth=s['pre_depth'], post_depth=s['post_depth'],
                      implicit_no_grad_min_iters=0, implicit_no_grad_max_iters=10,
                      implicit_with_grad_min_iters=1, implicit_with_grad_max_iters=12)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in FIXTURES['tiny'][kind]['var_sd'].items()},
                                os.path.join(path, 'model.safetensors'))


@pytest.mark.parametrize('kind', ['var', 'viar'])
def test_official_folder_draws_the_official_tokens(tmp_path, kind):
    """Strict load of every transformer key; the tokenizer comes from elsewhere (here the fixture's quantizer)."""
    write_official_folder(tmp_path, kind)
    model = VARHF.from_pretrained(tmp_path)
    assert not model.tokenizer_loaded and model.use_implicit == (kind == 'viar')
    vae = model.vae_proxy[0]
    vae.quantize.load_state_dict(FIXTURES['tiny'][kind]['quant_sd'], strict=True)
    model.cond_drop_rate = 0.0
    vae, model = vae.double(), model.double()
    for sampler in ('greedy', 'topk_topp'):
        want = official('tiny', kind, torch.float64)['samples'][(sampler, 3, 3)]
        got, _, margins, errors = sample_with_margins(vae, model, FIXTURES['tiny']['meta'], sampler, (3, 3))
        assert all(robust(m, e).all() for m, e in zip(margins, errors))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), sampler


def test_official_folder_with_a_renamed_key_fails_strictly(tmp_path):
    write_official_folder(tmp_path, 'var')
    sd = safetensors.torch.load_file(tmp_path / 'model.safetensors')
    sd['blocks.0.attn.qkv.weight'] = sd.pop('blocks.0.attn.mat_qkv.weight')
    safetensors.torch.save_file(sd, tmp_path / 'model.safetensors')
    with pytest.raises(Exception, match='mat_qkv'):
        VARHF.from_pretrained(tmp_path)


class FakeApi:
    """Records what push_to_hub asks of the Hub: the repo it creates and the files of the folder it uploads."""
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeApi.calls.append(('create_repo', repo_id))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, **kw):
        FakeApi.calls.append(('upload_folder', repo_id, sorted(os.listdir(folder_path)), kw['repo_type']))
        return f'https://huggingface.co/{repo_id}/commit/0'


def test_push_to_hub_uploads_the_folder(monkeypatch):
    monkeypatch.setattr(huggingface_hub.hub_mixin, 'HfApi', FakeApi)
    monkeypatch.setattr(FakeApi, 'calls', [])
    vae, var = tiny_vae_var(False)
    url = hub_model(vae, var, tiny_spec(False)).push_to_hub('someone/var-tiny')
    assert url.endswith('commit/0')
    (_, created), (_, repo, files, repo_type) = FakeApi.calls
    assert created == repo == 'someone/var-tiny' and repo_type == 'model'
    assert {'config.json', 'model.safetensors', 'vae.safetensors'} <= set(files)


def test_repo_id_while_offline_fails_with_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(HubLoadError) as e:
        VARHF.from_pretrained('someone/no-such-var', cache_dir=str(tmp_path))
    assert str(e.value).startswith('someone/no-such-var: not a local folder') and '\n' not in str(e.value)


def test_varhf_is_importable_from_models_var():
    import models.var
    assert models.var.VARHF is VARHF


def test_config_key_the_class_does_not_take_fails_naming_it(tmp_path):
    write_official_folder(tmp_path, 'viar')
    config = json.loads((tmp_path / 'config.json').read_text())
    config['implicit_nograd_min_iters'] = config.pop('implicit_no_grad_min_iters')
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(HubLoadError, match='implicit_nograd_min_iters'):
        VARHF.from_pretrained(tmp_path)


def test_importing_models_leaves_huggingface_hub_unloaded():
    """VARHF comes from models/hub.py on first access, so users who never touch the Hub do not pay its import."""
    import subprocess
    import sys
    code = 'import sys, models; assert "huggingface_hub" not in sys.modules; models.VARHF; assert "huggingface_hub" in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_viarhf_refuses_a_var_folder(tmp_path):
    write_official_folder(tmp_path, 'var')
    with pytest.raises(HubLoadError, match='holds a VAR'):
        VIARHF.from_pretrained(tmp_path)
    write_official_folder(tmp_path / 'viar', 'viar')
    assert type(VIARHF.from_pretrained(tmp_path / 'viar')) is VIARHF
