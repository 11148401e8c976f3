"""The fast path's candidates-only sampler (models/sample_ops.py `sample_candidates`): the exact sampler's
distribution (ties with the k-th logit kept, top-p's rule), drawn over the top-k candidates only."""
import math
from typing import Tuple

import pytest
import torch

from models import sample_ops
from models.sample_ops import candidate_weights, filter_top_k_top_p_, first_topk, sample_candidates, sample_top_k_top_p_
from models.schedules import IterSchedule
from tests.tiny import tiny_vae_var

V = 32
N = 20000   # draws per row: one call draws a row's N positions, all with the same logits
# 2.0 > 1.5 > 1.0 > 0.75 > 0.5 > four ties at 0.25 (the 6th largest): top_k=6 keeps 9 candidates, the tied ones
# a quarter of the mass; the rest of the vocabulary lies below
HEAD = [2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.25, 0.25, 0.25]


def top_k_candidates(logits_BlV: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vals_BlK, idx_BlK): every logit >= the k-th largest of its position (ties with the k-th all kept, as
    `filter_top_k_top_p_` keeps them) and its vocabulary id, padded with -inf to a common K >= top_k, the topk
    widened where `first_topk` has no room (one host sync; the sampler carries those ties on the k-th's column
    instead): the whole candidate list, to check `candidate_weights` on it."""
    vals_BlK, idx_BlK, kth_Bl1, _ = first_topk(logits_BlV, top_k)
    # int32: a bool sum into the default int64 is an order of magnitude slower over V
    n_ge = int((logits_BlV >= kth_Bl1).sum(dim=-1, dtype=torch.int32).max())
    if n_ge > vals_BlK.shape[-1]:   # more ties than room: widen
        vals_BlK, idx_BlK = logits_BlV.topk(n_ge, dim=-1, largest=True, sorted=False)
        vals_BlK = vals_BlK.masked_fill(vals_BlK < kth_Bl1, -torch.inf)
    return vals_BlK, idx_BlK


def tied_logits(rows: int, dtype=torch.float32) -> torch.Tensor:
    """(rows, N, V): each row the HEAD values above a tail in [-3, -1), at positions permuted per row."""
    g = torch.Generator().manual_seed(7)
    logits_BlV = torch.empty(rows, N, V)
    for b in range(rows):
        row = torch.cat((torch.tensor(HEAD), -1 - 2 * torch.rand(V - len(HEAD), generator=g)))
        logits_BlV[b] = row[torch.randperm(V, generator=g)]
    return logits_BlV.to(dtype)   # every HEAD value is exact in bf16, so the ties survive the cast


def exact_probs(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) the exact filter's fp32 probabilities of each row's first position."""
    return filter_top_k_top_p_(logits_BlV[:, 0].float().clone(), top_k, top_p).softmax(-1)


def tv_bound(support: int, draws: int, miss: float = 1e-6) -> float:
    """A bound on the total variation between N draws' frequencies and their distribution, passed with
    probability >= 1 - miss: E[TV] <= sqrt(support / N) / 2 (Cauchy-Schwarz) plus McDiarmid's deviation
    sqrt(ln(1 / miss) / (2 N)) (one draw moves TV by at most 1 / N)."""
    return 0.5 * math.sqrt(support / draws) + math.sqrt(math.log(1 / miss) / (2 * draws))


def total_variation(idx_BN: torch.Tensor, probs_BV: torch.Tensor) -> torch.Tensor:
    """(B,) total variation between each row's token frequencies and its probabilities."""
    freq_BV = torch.stack([torch.bincount(row, minlength=probs_BV.shape[-1]) for row in idx_BN]).float()
    return 0.5 * (freq_BV / idx_BN.shape[-1] - probs_BV).abs().sum(-1)


def rngs(kind: str, rows: int, seed: int):
    return torch.Generator().manual_seed(seed) if kind == 'global' else \
        [torch.Generator().manual_seed(seed + b) for b in range(rows)]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('rng_kind', ['global', 'per-row'])
@pytest.mark.parametrize('top_k, top_p', [(6, 0.0), (6, 0.75), (3, 0.0), (12, 0.97)])
def test_candidates_draw_the_exact_samplers_distribution(top_k, top_p, rng_kind, dtype):
    """top_k=6 keeps the four ties with the 6th value (9 tokens); top_p=0.75 then drops exactly them (the cut
    falls between distinct values, where the exact rule does not depend on sort order); 12 takes three tail
    tokens and 0.97 cuts two of them."""
    logits_BlV = tied_logits(2, dtype)
    probs_BV = exact_probs(logits_BlV, top_k, top_p)
    support = int((probs_BV > 0).sum(-1).max())
    bound = tv_bound(support, N)
    fast = total_variation(sample_candidates(logits_BlV.clone(), top_k, top_p, rngs(rng_kind, 2, 1)), probs_BV)
    exact = total_variation(sample_top_k_top_p_(logits_BlV.clone(), top_k, top_p, rngs(rng_kind, 2, 2)), probs_BV)
    assert (fast <= bound).all(), f'candidates sampler TV {fast.tolist()} > {bound:.4f}'
    assert (exact <= bound).all(), f'exact sampler TV {exact.tolist()} > {bound:.4f}'   # the reference itself


@pytest.mark.parametrize('top_k, top_p', [(6, 0.0), (6, 0.95), (2, 0.5)])
def test_candidates_never_draw_a_token_the_exact_filter_removes(top_k, top_p):
    logits_BlV = tied_logits(2)
    kept_BlV = torch.isfinite(filter_top_k_top_p_(logits_BlV.clone(), top_k, top_p))
    idx_Bl = sample_candidates(logits_BlV, top_k, top_p, torch.Generator().manual_seed(0))
    assert kept_BlV.gather(-1, idx_Bl.unsqueeze(-1)).all()
    if top_p == 0:   # and every kept token, ties with the k-th included, is drawn at some position
        assert torch.equal(torch.zeros_like(kept_BlV).scatter_(-1, idx_Bl.unsqueeze(-1), True).any(1),
                           kept_BlV.any(1))


@pytest.mark.parametrize('top_k, top_p', [(5, 0.0), (10, 0.8), (5, 0.5), (63, 0.9), (1, 0.0), (64, 0.3)])
def test_candidate_weights_are_the_exact_probabilities_under_heavy_ties(top_k, top_p):
    """Logits on a 0.5 grid, ties everywhere (as bf16 logits tie): the candidates carry the exact filter's
    probabilities. Where the top-p cut falls inside a tie group, which tied tokens it drops is sort order, in
    the exact rule too, so the kept count and the sorted probabilities are what must agree."""
    g = torch.Generator().manual_seed(0)
    logits_BlV = (torch.randn(3, 7, 64, generator=g) * 4).round() / 2
    want_BlV = filter_top_k_top_p_(logits_BlV.clone(), top_k, top_p).softmax(-1)
    vals_BlK, idx_BlK = top_k_candidates(logits_BlV, top_k)
    assert vals_BlK.shape[-1] >= top_k and torch.equal(logits_BlV.gather(-1, idx_BlK)[vals_BlK > -torch.inf],
                                                       vals_BlK[vals_BlK > -torch.inf])
    w_BlK = candidate_weights(vals_BlK, top_p)
    got_BlV = torch.zeros_like(logits_BlV).scatter_add_(-1, idx_BlK, w_BlK)
    got_BlV /= got_BlV.sum(-1, keepdim=True)
    assert torch.equal((got_BlV > 0).sum(-1), (want_BlV > 0).sum(-1))
    torch.testing.assert_close(got_BlV.sort(-1)[0], want_BlV.sort(-1)[0], rtol=1e-5, atol=1e-6)
    if top_p == 0:   # no top-p cut: the very same tokens
        torch.testing.assert_close(got_BlV, want_BlV, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('top_p, kept', [(0.0, 44), (0.9, 37)])
def test_a_tie_group_wider_than_the_first_topk_is_kept_whole(top_p, kept):
    """Three logits above 41 ties with the 4th: all 44 are candidates, as the exact filter keeps them (more than
    the first topk has room for); top-p 0.9 then drops 7 of the ties (mass 7 of 71.2)."""
    logits_BlV = torch.full((2, 3, 64), -2.0)
    logits_BlV[..., :43] = 0.0
    logits_BlV[..., [5, 20, 50]] = torch.tensor([3.0, 2.0, 1.0])
    want_BlV = filter_top_k_top_p_(logits_BlV.clone(), 4, top_p).softmax(-1)
    vals_BlK, idx_BlK = top_k_candidates(logits_BlV, 4)
    got_BlV = torch.zeros_like(logits_BlV).scatter_add_(-1, idx_BlK, candidate_weights(vals_BlK, top_p))
    assert torch.equal((got_BlV > 0).sum(-1), (want_BlV > 0).sum(-1)) and int((want_BlV > 0).sum(-1)[0, 0]) == kept
    torch.testing.assert_close((got_BlV / got_BlV.sum(-1, keepdim=True)).sort(-1)[0], want_BlV.sort(-1)[0])


def test_a_rows_draws_do_not_depend_on_the_other_rows():
    """Per-row generators: row 1 draws the same tokens beside a row with more ties (more candidates) or alone."""
    logits_BlV = tied_logits(2)[:, :500]
    other_lV = logits_BlV[0].clone()
    other_lV[other_lV < 0.25] = 0.25   # ties with the k-th everywhere: this row alone has V candidates
    alone = sample_candidates(logits_BlV[1:].clone(), 6, 0.9, [torch.Generator().manual_seed(5)])
    beside = sample_candidates(torch.stack((other_lV, logits_BlV[1])), 6, 0.9,
                               [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)])
    assert torch.equal(beside[1:], alone)


@pytest.mark.parametrize('top_k', [0, V, V + 5])
def test_no_top_k_falls_back_to_the_exact_sampler(top_k):
    logits_BlV = tied_logits(2)[:, :300]
    want = sample_top_k_top_p_(logits_BlV.clone(), top_k, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(sample_candidates(logits_BlV.clone(), top_k, 0.9, torch.Generator().manual_seed(3)), want)


def test_candidates_leave_the_logits_and_the_global_rng_reproducible():
    logits_BlV = tied_logits(1)[:, :100]
    before = logits_BlV.clone()
    torch.manual_seed(11)
    a = sample_candidates(logits_BlV, 6, 0.9)
    torch.manual_seed(11)
    assert torch.equal(sample_candidates(logits_BlV, 6, 0.9), a) and torch.equal(logits_BlV, before)


@pytest.mark.parametrize('fast, more_smooth, sampler', [(True, False, 'sample_candidates'),
                                                        (False, False, 'sample_top_k_top_p_'),
                                                        (True, True, 'sample_top_k_top_p_')])
def test_the_fast_path_samples_over_the_candidates(monkeypatch, fast, more_smooth, sampler):
    """fast=True draws with `sample_candidates`; the exact path, and more_smooth (which reads the logits the exact
    sampler filters in place), with `sample_top_k_top_p_`."""
    _, var = tiny_vae_var(False)
    calls = {'sample_candidates': 0, 'sample_top_k_top_p_': 0}

    def counted(name):
        inner = getattr(sample_ops, name)

        def sampler_fn(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)
        return sampler_fn
    for name in calls:
        monkeypatch.setattr(sample_ops, name, counted(name))
    var.autoregressive_infer_cfg(2, 1, g_seed=0, cfg=1.5, top_k=10, top_p=0.9, more_smooth=more_smooth,
                                 schedule=IterSchedule([1] * 4), fast=fast)
    assert calls[sampler] == 4 and sum(calls.values()) == 4, calls   # one draw per scale


def many_ties(rows: int) -> torch.Tensor:
    """(1, rows, 64): 3, 2, 1 above 42 ties at 0 (the 4th largest) above -2."""
    logits_BlV = torch.full((1, rows, 64), -2.0)
    logits_BlV[..., :44] = 0.0
    logits_BlV[..., [5, 20, 50]] = torch.tensor([3.0, 2.0, 1.0])
    return logits_BlV


@pytest.mark.parametrize('top_p', [0.0, 0.5, 0.9, 0.93, 0.999])
def test_ties_beyond_the_topks_room_weigh_as_many_tokens_as_the_exact_rule_keeps(top_p):
    """first_topk holds 20 of the 45 tokens >= the 4th; the k-th's column carries the other ties' kept mass: per
    logit value, the weights equal the exact filter's probabilities (top-p cuts inside the tie group)."""
    logits_BlV = many_ties(1)
    vals_BlK, idx_BlK, kth_Bl1, kpos_Bl1 = first_topk(logits_BlV, 4)
    n_Bl1 = (logits_BlV == kth_Bl1).sum(-1, keepdim=True) - (vals_BlK == kth_Bl1).sum(-1, keepdim=True)
    w_BlK = candidate_weights(vals_BlK, top_p, (n_Bl1, kpos_Bl1))
    got_V = torch.zeros(64).scatter_add_(0, idx_BlK[0, 0], w_BlK[0, 0] / w_BlK.sum())
    want_V = exact_probs(logits_BlV, 4, top_p)[0]
    for level in (3.0, 2.0, 1.0, 0.0):
        at = logits_BlV[0, 0] == level
        torch.testing.assert_close(got_V[at].sum(), want_V[at].sum(), msg=f'mass at logit {level}')


@pytest.mark.parametrize('top_p', [0.0, 0.9])
def test_ties_beyond_the_topks_room_are_drawn_with_their_exact_mass(top_p):
    """42 ties with the 4th logit, more than the first topk's 20 columns: the law of the drawn logit value is the
    exact filter's (top-p 0.9 drops some ties; which ones is sort order), and only ties or the 3 larger logits
    are drawn, every one of the 45 at some position when all are kept."""
    logits_BlV = many_ties(N)
    levels = torch.tensor([-2.0, 0.0, 1.0, 2.0, 3.0])
    want_B5 = torch.zeros(5).index_add_(0, torch.bucketize(logits_BlV[0, 0], levels),
                                        exact_probs(logits_BlV, 4, top_p)[0]).view(1, 5)
    idx_BN = sample_candidates(logits_BlV.clone(), 4, top_p, torch.Generator().manual_seed(0))
    drawn_BN = torch.bucketize(logits_BlV[0, 0][idx_BN], levels)
    tv = total_variation(drawn_BN, want_B5)
    assert tv <= tv_bound(4, N), f'TV over logit values {tv.item():.4f}'
    assert (logits_BlV[0, 0][idx_BN] >= 0).all()
    if top_p == 0:
        assert torch.equal(torch.bincount(idx_BN[0], minlength=64) > 0, logits_BlV[0, 0] >= 0)


class NoHostSync(torch.Tensor):
    """A tensor (and every tensor computed from it) that refuses to be read back to Python."""

    def item(self):
        raise AssertionError('host sync: a tensor was read back to Python')

    __int__ = __float__ = __bool__ = __index__ = tolist = item


@pytest.mark.parametrize('top_p', [0.0, 0.9])
def test_the_candidates_draw_reads_nothing_back_to_the_host(top_p):
    logits_BlV = tied_logits(2)[:, :50]
    logits_BlV[0, :, :] = 0.25   # a row of ties with the k-th everywhere: more than the topk has room for
    want = sample_candidates(logits_BlV.clone(), 6, top_p, torch.Generator().manual_seed(1))
    got = sample_candidates(logits_BlV.clone().as_subclass(NoHostSync), 6, top_p, torch.Generator().manual_seed(1))
    assert type(got) is NoHostSync and torch.equal(got.as_subclass(torch.Tensor), want)
