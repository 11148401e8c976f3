"""Rounding-error bounds for comparing with numbers computed on another machine, and sampling decision margins.

float32 results differ between CPUs in their last bits: GEMM, convolution and vector kernels (MKL, oneDNN, ATen)
pick other code paths, and so other summation orders, on other CPUs. A comparison with numbers made elsewhere
therefore needs a tolerance derived from the computation, not tuned to one machine:

    |computed - exact| <= LAMBDA * sqrt(stages * n_max) * u * scale

u is the dtype's unit roundoff; n_max the longest sum in the computation and stages the number of sequential
reductions from the input to the output, so stages * n_max bounds the roundings on the longest path; scale the size
of the output. Each rounding is an error of relative size at most u; taken as independent with mean zero, N of
them add up to more than LAMBDA * sqrt(N) * u with probability below 2 exp(-LAMBDA^2 / 2) (the probabilistic
rounding analysis of Higham and Mary, SIAM J. Sci. Comput. 2019): 3e-8 for LAMBDA = 6. The worst case,
N * u, is never approached by real kernels and would leave float32 tolerances of 0.1 at L = 2240. The bound
leaves out how much the weights amplify errors; the tests measure what is left: under capped kernels (another
summation order) the float64 logits differ from the official ones by 1/18 of this bound or less, and float32 ones
from float64 by 1/7 or less.

Sampled tokens are compared exactly. That holds on every machine only where each sampling decision has a margin
wider than the error of the logits it is made from: `decisions` measures them, in logit units.
"""
import math
from typing import List, Optional, Tuple

import torch

LAMBDA = 6.0   # standard deviations of the summed rounding errors: exceeded with probability 3e-8
# reductions on the path of one transformer block: two LayerNorms, the q/k L2 norms, qkv, attention scores, the
# softmax, the attention-weighted sum, proj, fc1, fc2, and the AdaLN modulation that scales the block
REDUCTIONS_PER_BLOCK = 11
REDUCTIONS_PER_ITERATION = 2   # VIAR's projection of [z, x]: two Linears
REDUCTIONS_HEAD = 3            # word embedding, head LayerNorm, head


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next representable number (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def reduction_stages(block_calls: int, implicit_iters: int = 0) -> int:
    """Sequential reductions of a forward with this many block calls and VIAR iterations."""
    return REDUCTIONS_PER_BLOCK * block_calls + REDUCTIONS_PER_ITERATION * implicit_iters + REDUCTIONS_HEAD


def rounding_bound(dtype: torch.dtype, stages: int, n_max: int, scale: float) -> float:
    """Absolute bound on the rounding error of an output of size `scale` (see the module docstring)."""
    return LAMBDA * math.sqrt(stages * n_max) * unit_roundoff(dtype) * scale


def decisions(logits_BlV: torch.Tensor, top_k: int, top_p: float, q_BlV: Optional[torch.Tensor], slack: float = 0.0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token, margin), each (B, l): the token the sampler's decisions lead to, and the smallest margin, in logit
    units, of the decisions it depends on (the token stays the same under any change of every logit by less than a
    quarter of the margin: see `robust` in the tests).

    The sampler keeps the top-k logits, then the smallest set whose probability reaches top_p, and draws with
    torch.multinomial, which (one draw) takes the argmax of p / q, i.e. of the score logit - log q, with q ~ Exp(1)
    from the generator (q_BlV None: greedy, q = 1). Three kinds of decision: the best score against the second
    best kept one; the k-th logit against the (k+1)-th; each cumulative probability against 1 - top_p (shifting
    every logit by at most d moves a cumulative probability by at most 2d, so its distance counts at half). A
    top-k or top-p decision about a token matters only if that token wins, or would win where it kept: its score
    within `slack` of the winner's or above.
    """
    logits = logits_BlV.double()
    V = logits.shape[-1]
    score = logits if q_BlV is None else logits - q_BlV.double().log()
    inf = torch.full(logits.shape[:-1], torch.inf, dtype=torch.float64)
    kept = torch.ones_like(logits, dtype=torch.bool)
    boundary = torch.full_like(logits, torch.inf)   # per token: the margin of the filter decision about it
    if 0 < top_k < V:
        top = logits.topk(top_k + 1, dim=-1)
        gap = top.values[..., top_k - 1] - top.values[..., top_k]
        kept = logits >= top.values[..., top_k - 1:top_k]
        for r in (top_k - 1, top_k):   # the last kept and the first dropped token
            boundary.scatter_(-1, top.indices[..., r:r + 1], gap.unsqueeze(-1))
    if top_p > 0:
        sorted_l, order = logits.masked_fill(~kept, -torch.inf).sort(dim=-1)
        cum = sorted_l.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False   # the most likely token is always kept
        dist = ((cum - (1 - top_p)).abs() / 2).masked_fill(sorted_l == -torch.inf, torch.inf)
        dist[..., -1] = torch.inf
        kept = kept & ~torch.zeros_like(drop).scatter(-1, order, drop)
        boundary = torch.minimum(boundary, torch.full_like(boundary, torch.inf).scatter(-1, order, dist))
    kept_score = score.masked_fill(~kept, -torch.inf)
    best2 = kept_score.topk(2, dim=-1)
    winner, second = best2.indices[..., 0], best2.values[..., 1]
    margin = torch.where(second > -torch.inf, best2.values[..., 0] - second, inf)
    matters = score >= best2.values[..., :1] - slack   # the winner itself, and any token that could take its place
    return winner, torch.minimum(margin, boundary.masked_fill(~matters, torch.inf).amin(dim=-1))


def replay_draws(g_seed: int, shapes: List[tuple], dtype: torch.dtype) -> List[torch.Tensor]:
    """The Exp(1) draws torch.multinomial makes (one draw per row) for probability tensors of these shapes, in
    order, from a generator seeded with g_seed: it fills a tensor like its input with exponential_."""
    g = torch.Generator().manual_seed(g_seed)
    return [torch.empty(shape, dtype=dtype).exponential_(generator=g) for shape in shapes]
