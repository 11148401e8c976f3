"""Training memory: S-JFB keeps activations flat in the no-grad iterations n; VIAR's size matches the paper."""
import json
import os

import pytest
import torch

from models import VQVAE, build_var
from tests.tiny import tiny_tokens, tiny_vae_var
from utils import memory
from utils.train.lr_control import param_groups

COUNTS = json.load(open(os.path.join(os.path.dirname(__file__), 'data', 'official_checkpoint_keys.json')))['param_counts']


def saved_activation_bytes(var, jfb_iters, B: int = 2) -> int:
    """Bytes autograd saves for backward in one training forward (utils.memory's counter)."""
    vae = var.vae_proxy[0]
    idx_Bl, x_BLCv = tiny_tokens(vae, var, B)
    torch.manual_seed(0)
    return memory.saved_activation_bytes(lambda: var(torch.arange(B) % var.num_classes, x_BLCv, jfb_iters=jfb_iters),
                                         var.parameters())


def test_viar_activation_memory_is_flat_in_n_and_grows_with_m():
    _, var = tiny_vae_var(True)
    var.train()
    by_n = [saved_activation_bytes(var, (n, 2)) for n in (0, 3, 9)]
    assert by_n[0] == by_n[1] == by_n[2]
    by_m = [saved_activation_bytes(var, (0, m)) for m in (1, 2, 4)]
    assert by_m[0] < by_m[1] < by_m[2]
    step = by_m[1] - by_m[0]   # each iteration with grad costs the same
    assert by_m[2] - by_m[1] == 2 * step


def test_var_activation_memory_grows_with_depth_and_grad_ckpt_cuts_it():
    sizes = []
    for depth in (2, 4, 8):
        _, var = tiny_vae_var(False, depth=depth)
        sizes.append(saved_activation_bytes(var.train(), None))
    assert sizes[0] < sizes[1] < sizes[2]
    _, viar = tiny_vae_var(True)
    viar.train()
    plain = saved_activation_bytes(viar, (0, 4))
    viar.grad_ckpt = True
    assert saved_activation_bytes(viar, (0, 4)) < plain / 2


@pytest.mark.parametrize('name,depth,implicit', [('var_d30', 30, False), ('viar_d30', 30, True)])
def test_full_size_trainable_parameters_and_optimizer_state_match_the_paper(name, depth, implicit):
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
        var = build_var(vae, depth=depth, use_implicit=implicit, pre_depth=5, post_depth=5, embed_dim=64 * depth,
                        num_heads=depth, attn_l2_norm=True)
    _, params, groups = param_groups(var)   # what the optimizer trains
    n = sum(p.numel() for p in params)
    assert n == COUNTS[name] == sum(p.numel() for g in groups for p in g['params'])
    # paper Fig. 6: fp32 params+grads 2.87 GB (VIAR) vs 7.49 GB (VAR-d30); AdamW state twice that
    gib = n * 4 / 2 ** 30
    assert round(gib, 2) == (2.87 if implicit else 7.49)
    assert round(2 * gib, 2) == (5.74 if implicit else 14.98)
    assert abs(COUNTS['viar_d30'] / COUNTS['var_d30'] - 0.3835) < 1e-3
