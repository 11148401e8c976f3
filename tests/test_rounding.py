"""The helpers that make the official-fixture comparisons hold on every CPU (tests/rounding.py)."""
import math

import torch

from models import sample_ops
from tests.rounding import decisions, replay_draws, rounding_bound, unit_roundoff

INF = math.inf


def test_unit_roundoff_and_bound():
    assert unit_roundoff(torch.float32) == 2.0 ** -24 and unit_roundoff(torch.float64) == 2.0 ** -53
    # 6 sqrt(4 * 25) u scale
    assert math.isclose(rounding_bound(torch.float64, 4, 25, 3.0), 6 * 10 * 2.0 ** -53 * 3.0)


def test_greedy_margin_is_the_gap_to_the_second_logit():
    logits = torch.tensor([[[0.0, 2.0, 1.5, -1.0]]], dtype=torch.float64)
    token, margin = decisions(logits, top_k=1, top_p=0.0, q_BlV=None)
    assert token.item() == 1 and math.isclose(margin.item(), 0.5)


def test_draw_margin_is_between_the_two_best_scores():
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    q = torch.tensor([[[1.0, math.exp(-0.3), math.exp(-0.2), 2.0]]], dtype=torch.float64)   # scores 0, 0.3, 0.2, -log 2
    token, margin = decisions(logits, top_k=0, top_p=0.0, q_BlV=q)
    assert token.item() == 1 and math.isclose(margin.item(), 0.1, rel_tol=1e-9)


def test_top_k_boundary_counts_only_where_the_token_could_win():
    # top-2 keeps 3.0 and 1.0; 0.999 is out by 1e-3
    logits = torch.tensor([[[3.0, 1.0, 0.999, -2.0]]], dtype=torch.float64)
    q_wins = torch.ones(1, 1, 4, dtype=torch.float64)
    _, margin = decisions(logits, top_k=2, top_p=0.0, q_BlV=q_wins)
    assert margin.item() > 1.0   # 0.999 scores 2 below the winner: its side of the boundary changes nothing
    q_loses = torch.tensor([[[1.0, 1.0, math.exp(-3.0), 1.0]]], dtype=torch.float64)   # 0.999 + 3 beats 3.0 if kept
    _, margin = decisions(logits, top_k=2, top_p=0.0, q_BlV=q_loses)
    assert math.isclose(margin.item(), 1e-3, rel_tol=1e-6)
    # and the slack makes a token that comes within it count too
    _, margin = decisions(logits, top_k=2, top_p=0.0, q_BlV=q_wins, slack=2.5)
    assert math.isclose(margin.item(), 1e-3, rel_tol=1e-6)


def test_top_p_boundary_margin_in_logit_units():
    # probabilities 0.5, 0.3, 0.2: with top_p 0.79 the 0.2 token sits 0.01 from the cut (cum 0.2 vs 1 - 0.79)
    logits = torch.tensor([[[math.log(0.5), math.log(0.3), math.log(0.2)]]], dtype=torch.float64)
    q = torch.tensor([[[1.0, 1.0, 0.1]]], dtype=torch.float64)   # the 0.2 token would win the draw if kept
    token, margin = decisions(logits, top_k=0, top_p=0.79, q_BlV=q)
    assert token.item() == 0   # dropped: cum 0.2 <= 0.21
    assert math.isclose(margin.item(), 0.005, rel_tol=1e-6)   # |0.2 - 0.21| / 2


def test_decisions_reproduce_the_sampler_with_replayed_draws():
    """The token `decisions` derives is the one the project's sampler draws from the same generator."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for top_k, top_p in ((0, 0.0), (1, 0.0), (5, 0.0), (0, 0.9), (10, 0.7)):
            logits = torch.randn(3, 7, 48, generator=g, dtype=dtype) * 2
            got = sample_ops.sample_top_k_top_p_(logits.clone(), top_k, top_p, torch.Generator().manual_seed(4))
            q = replay_draws(4, [(21, 48)], dtype)[0].view(3, 7, 48)
            token, margin = decisions(logits, top_k, top_p, q)
            assert torch.equal(token, got) and (margin > 0).all()


def test_a_near_tie_is_reported():
    """What the fixture test's float64 assertion guards against: a draw decided by 1e-14 would not be robust."""
    logits = torch.tensor([[[0.0, 1e-14, -5.0]]], dtype=torch.float64)
    _, margin = decisions(logits, top_k=0, top_p=0.0, q_BlV=torch.ones(1, 1, 3, dtype=torch.float64))
    assert margin.item() < 4 * rounding_bound(torch.float64, 10, 100, 1.0)
