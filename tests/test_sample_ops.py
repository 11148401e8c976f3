"""Token sampling arithmetic (models/sample_ops.py): the CFG ramp and guidance, top-k / top-p filtering."""
import pytest
import torch

from models.sample_ops import cfg_ratio, filter_top_k_top_p_, guide
from models.sample_ops import filter_top_k_top_p_


@pytest.mark.parametrize('si,K,want', [
    (0, 4, 0.0), (1, 4, 0.5), (2, 4, 1.0), (3, 4, 1.5),   # 1.5 * k / 3: from 0 at the first scale to cfg at the last
    (0, 2, 0.0), (1, 2, 1.5),
    (5, 11, 0.75),                                        # 1.5 * 5 / 10
    (0, 1, 1.5),                                          # one scale: it is the last, full guidance
])
def test_cfg_ratio_ramps_linearly_to_cfg_at_the_last_scale(si, K, want):
    assert cfg_ratio(1.5, si, K) == pytest.approx(want, abs=1e-12)


def test_guide_is_one_plus_t_cond_minus_t_uncond():
    cond = torch.tensor([[[1.0, 2.0, -4.0]], [[0.5, 0.0, 3.0]]])      # (B=2, l=1, V=3)
    uncond = torch.tensor([[[3.0, -1.0, -4.0]], [[0.5, 2.0, 1.0]]])
    logits_2BlV = torch.cat((cond, uncond))                           # conditional half first
    # t = 0.5: 1.5 * cond - 0.5 * uncond
    want = torch.tensor([[[0.0, 3.5, -4.0]], [[0.5, -1.0, 4.0]]])
    assert torch.allclose(guide(logits_2BlV, 0.5), want)
    assert torch.equal(guide(logits_2BlV, 0.0), cond)
    # t = 2: 3 * cond - 2 * uncond
    assert torch.allclose(guide(logits_2BlV, 2.0), torch.tensor([[[-3.0, 8.0, -4.0]], [[0.5, -4.0, 7.0]]]))


def test_tiny_top_p_keeps_exactly_the_argmax():
    """top_p -> 0 asks for the smallest set reaching ~0 probability: the most likely token alone, never none."""
    g = torch.Generator().manual_seed(0)
    logits_BlV = torch.randn(3, 5, 40, generator=g) * 3
    out = filter_top_k_top_p_(logits_BlV.clone(), top_p=1e-9)
    kept = torch.isfinite(out)
    assert torch.equal(kept.sum(-1), torch.ones(3, 5, dtype=torch.long)), 'each position keeps exactly one token'
    assert torch.equal(out.argmax(-1), logits_BlV.argmax(-1))
    assert torch.equal(out[kept], logits_BlV.amax(-1).flatten())     # kept logits are unchanged
    assert (out[~kept] == -torch.inf).all()
    # combined with top-k, the argmax still survives
    assert torch.equal(torch.isfinite(filter_top_k_top_p_(logits_BlV.clone(), top_k=3, top_p=1e-9)), kept)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    for p, keep in [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.95, 4)]:
        out = filter_top_k_top_p_(probs.log().view(1, 1, 4).clone(), top_p=p)
        assert torch.isfinite(out).sum().item() == keep, p
    out = filter_top_k_top_p_(probs.log().view(1, 1, 4).clone(), top_k=2)
    assert torch.isfinite(out).view(-1).tolist() == [True, True, False, False]
