"""utils/train/ema.py: the EMA of the weights."""
import pytest
import torch

from utils.train.ema import ModelEMA, ema_decay_at
from tests.tiny import tiny_vae_var


def test_ema_follows_the_weights_with_warmed_up_decay():
    lin = torch.nn.Linear(2, 2)
    ema = ModelEMA(lin, 0.9)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    d = ema_decay_at(0.9, 0)
    assert d == pytest.approx(0.1)
    assert torch.allclose(ema.shadow['weight'], d * start + (1 - d) * lin.weight)
    assert ema_decay_at(0.9, 10 ** 6) == 0.9
    _, var = tiny_vae_var(True)   # buffers holding -inf (the attention mask) are copied, not averaged
    ema = ModelEMA(var, 0.99)
    ema.update(var)
    assert torch.equal(ema.shadow['attn_bias_for_masking'], var.attn_bias_for_masking)
