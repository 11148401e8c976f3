"""The built models have exactly the official checkpoint keys and shapes (built on the meta device)."""
import json
import os

import pytest
import torch

from models import VQVAE, build_var

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), 'data', 'official_checkpoint_keys.json')))
SPECS = {'var_d16': (16, False), 'var_d20': (20, False), 'var_d24': (24, False), 'var_d30': (30, False),
         'viar_d16': (16, True), 'viar_d30': (30, True)}


def meta_models(depth: int, use_implicit: bool):
    """Full-size official VQVAE and transformer without allocating memory."""
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
        var = build_var(vae, depth=depth, use_implicit=use_implicit, pre_depth=5, post_depth=5, embed_dim=64 * depth,
                        num_heads=depth, attn_l2_norm=True, drop_path_rate=0.1 * depth / 24)
    return vae, var


@pytest.mark.parametrize('name', sorted(SPECS))
def test_transformer_keys_and_shapes_match_official(name):
    _, var = meta_models(*SPECS[name])
    got = {k: list(v.shape) for k, v in var.state_dict().items()}
    want = KEYS[name]
    assert sorted(set(want) - set(got)) == [], 'missing official keys'
    assert sorted(set(got) - set(want)) == [], 'keys the official file lacks'
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    assert sum(p.numel() for p in var.parameters()) == KEYS['param_counts'][name]


def test_vae_keys_and_shapes_match_official():
    vae, _ = meta_models(16, False)
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert got == KEYS['vae_ch160v4096z32']
    assert sum(p.numel() for p in vae.parameters()) == KEYS['param_counts']['vae_ch160v4096z32']

