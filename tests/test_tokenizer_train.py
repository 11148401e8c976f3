"""Tokenizer training: schedule and restart helpers, loss goes down, strict reload into build_vae_var, exact resume."""
import os

import numpy as np
import pytest
import torch

from models import build_vae_var
from models.quant import usage_margin
from train_tokenizer import main as train_tokenizer_main
from utils.checkpoint import load_vae_weights
from utils.train.tokenizer_trainer import (EXPORT, LAST_CKPT, TokenizerConfig, TokenizerConfigError, build_tokenizer,
                                     check_config, load_tokenizer, lr_at, restart_dead_codes, scale_residuals,
                                     train_tokenizer)

TINY = dict(reso=8, patch_nums=(1, 2, 4), ch_mult=(1, 2), num_res_blocks=1, ch=32, V=32, Cvae=8, bs=8,
            lr=3e-3, warmup_steps=2, log_every=5, save_every=1000, tensorboard=False, mid_reso=1.0)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """A tiny image folder: two classes of 8 px blobs (bright square / bright bar), train and val."""
    from PIL import Image
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for split, n in (('train', 16), ('val', 4)):
        for cls in (0, 1):
            os.makedirs(root / split / str(cls))
            for i in range(n):
                img = np.zeros((8, 8, 3), np.uint8)
                r, c = rng.integers(0, 4, size=2)
                if cls == 0:
                    img[r:r + 4, c:c + 4] = 230
                else:
                    img[:, c + 2] = 200
                Image.fromarray(img).save(root / split / str(cls) / f'{i}.png')
    return str(root)


def cfg_for(folder, out_dir, **kw) -> TokenizerConfig:
    return TokenizerConfig(data_path=folder, out_dir=str(out_dir), **{**TINY, **kw})


def vae_build_kwargs(arch):
    """Keyword arguments of models.build_vae_var that rebuild a tokenizer from its file's config."""
    return dict(patch_nums=tuple(arch['patch_nums']), V=arch['V'], Cvae=arch['Cvae'], ch=arch['vae_ch'],
                share_quant_resi=arch['share_quant_resi'], vae_ch_mult=tuple(arch['vae_ch_mult']),
                vae_num_res_blocks=arch['vae_num_res_blocks'])


def test_lr_schedule_warms_up_peaks_and_decays():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 1e-3, 10, 0.1) == pytest.approx(1e-4)


def test_config_rejects_resolution_that_does_not_fit():
    with pytest.raises(TokenizerConfigError, match='--reso 8'):
        check_config(TokenizerConfig(**{**TINY, 'reso': 16}))
    check_config(TokenizerConfig(**TINY))


def test_restart_moves_only_unused_codes_onto_residuals():
    torch.manual_seed(0)
    vae = build_tokenizer(TokenizerConfig(**TINY).arch(), train=True)
    q = vae.quantize
    f_BChw = torch.randn(4, 8, 4, 4)
    pool_NC = torch.cat(scale_residuals(q, f_BChw))
    assert pool_NC.shape == (4 * (1 + 4 + 16), 8)
    g = torch.Generator().manual_seed(0)
    assert restart_dead_codes(q, f_BChw, g) == q.vocab_size          # empty EMA: every code is initialised from data
    dist_VN = (q.embedding.weight.data[:, None] - pool_NC[None]).norm(dim=-1)
    assert dist_VN.min(dim=1).values.max() < 1e-5
    margin = usage_margin(4 * 16, q.vocab_size)
    q.ema_vocab_hit_SV.fill_(2 * margin)
    q.ema_vocab_hit_SV[:, :3] = 0                                     # three codes unused at every scale
    before = q.embedding.weight.data.clone()
    assert restart_dead_codes(q, f_BChw * 2, g) == 3
    assert torch.equal(q.embedding.weight.data[3:], before[3:])
    assert not torch.equal(q.embedding.weight.data[:3], before[:3])
    assert (q.ema_vocab_hit_SV[:, :3] >= margin).all()


def test_training_lowers_reconstruction_error(folder, tmp_path):
    untrained = train_tokenizer(cfg_for(folder, tmp_path / 'a', max_steps=0))
    trained = train_tokenizer(cfg_for(folder, tmp_path / 'b', max_steps=25, restart_every=5))
    assert trained['val_recon_mse'] < 0.7 * untrained['val_recon_mse']
    assert os.path.isfile(tmp_path / 'b' / 'log.txt')


def test_export_reloads_strictly_into_build_vae_var(folder, tmp_path):
    cfg = cfg_for(folder, tmp_path, max_steps=3)
    train_tokenizer(cfg)
    path = str(tmp_path / EXPORT)
    obj = torch.load(path, map_location='cpu', weights_only=False)
    vae, _ = build_vae_var('cpu', depth=2, embed_dim=32, num_heads=2, num_classes=2, **vae_build_kwargs(obj['config']))
    load_vae_weights(vae, path, strict=True)
    same, arch = load_tokenizer(path)
    assert arch == cfg.arch()
    img = torch.rand(3, 3, 8, 8) * 2 - 1
    for a, b in zip(vae.img_to_idxBl(img), same.img_to_idxBl(img)):
        assert torch.equal(a, b)
    # a differently sized model refuses the file
    other, _ = build_vae_var('cpu', depth=2, embed_dim=32, num_heads=2, num_classes=2,
                             **vae_build_kwargs({**obj['config'], 'V': 64}))
    with pytest.raises(Exception, match='shape'):
        load_vae_weights(other, path)


def test_resume_continues_exactly(folder, tmp_path):
    straight = train_tokenizer(cfg_for(folder, tmp_path / 'straight', max_steps=12, restart_every=4))
    train_tokenizer(cfg_for(folder, tmp_path / 'resumed', max_steps=12, restart_every=4, stop_at=7))
    assert not os.path.exists(tmp_path / 'resumed' / EXPORT)
    resumed = train_tokenizer(cfg_for(folder, tmp_path / 'resumed', max_steps=12, restart_every=4))
    a = torch.load(tmp_path / 'straight' / LAST_CKPT, weights_only=False)
    b = torch.load(tmp_path / 'resumed' / LAST_CKPT, weights_only=False)
    assert b['step'] == 12
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-6), k
    assert resumed['val_recon_mse'] == pytest.approx(straight['val_recon_mse'], rel=1e-5)
    with open(tmp_path / 'resumed' / 'log.txt') as f:
        assert 'resumed from' in f.read()


def test_cli_reports_bad_folder_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_tokenizer_main(['--data_path', str(tmp_path / 'missing'), '--out_dir', str(tmp_path / 'o'),
                              '--reso', '8', '--patch_nums', '1,2,4', '--ch_mult', '1,2', '--tensorboard', 'False'])
    assert 'missing' in str(e.value)


def test_tokenizer_events():
    from utils.train.tokenizer_trainer import TokenizerConfig, events_at
    cfg = TokenizerConfig(max_steps=10, restart_every=4, restart_until=0.5, log_every=3, save_every=4, stop_at=6)
    ev = [events_at(s, cfg) for s in range(10)]
    assert [s for s, e in enumerate(ev) if e.restart] == [0, 4]          # every 4, until half the run
    assert [s + 1 for s, e in enumerate(ev) if e.log] == [3, 6, 9, 10]    # every 3 and the last
    assert [s + 1 for s, e in enumerate(ev) if e.save] == [4, 8]          # never at the end: the final save does
    assert [s + 1 for s, e in enumerate(ev) if e.stop] == [6]
