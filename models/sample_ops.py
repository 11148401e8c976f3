"""Token sampling arithmetic: CFG ratio, top-k / top-p filtering, the fast path's draw over the top-k candidates,
seeded Gumbel softmax.

Shapes: B batch, l tokens of the current scale, V vocabulary, K top-k candidates of a position (top_k, more
where logits tie with the k-th).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def cfg_ratio(cfg: float, si: int, num_scales: int) -> float:
    """Guidance weight t at scale si: grows linearly from 0 to cfg over the scales."""
    return cfg * si / (num_scales - 1) if num_scales > 1 else cfg


def guide(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, with the conditional half first."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """In place: -inf outside the top-k, then outside the smallest set whose probability reaches top_p."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False   # always keep the most likely token
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, order_BlV, drop_sorted), -torch.inf)
    return logits_BlV


Rng = Union[None, torch.Generator, List[torch.Generator]]


def make_rng(g_seed: Union[None, int, Sequence[int]], device) -> Rng:
    """None (global RNG), one generator for the batch (an int seed, as official), or one per row (a list): per-row
    generators make a row's draws independent of the rest of the batch, so batching seeds gives the same images as
    one call per seed; [s] draws exactly what s draws for B=1."""
    if g_seed is None:
        return None
    if isinstance(g_seed, int):
        return torch.Generator(device=device).manual_seed(g_seed)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in g_seed]


def sample_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng: Rng = None) -> torch.Tensor:
    """Filter in place, then draw one token per position: returns idx_Bl."""
    B, l, V = logits_BlV.shape
    probs_BlV = filter_top_k_top_p_(logits_BlV, top_k, top_p).softmax(dim=-1)
    if isinstance(rng, list):
        return torch.stack([torch.multinomial(probs_BlV[b], 1, replacement=True, generator=g).view(l)
                            for b, g in enumerate(rng)])
    return torch.multinomial(probs_BlV.view(-1, V), num_samples=1, replacement=True, generator=rng).view(B, l)


def first_topk(logits_BlV: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One topk of fixed width top_k + room for ties with the k-th (bf16 logits tie often), no host sync:
    (vals_BlK masked to -inf below the k-th, idx_BlK vocabulary ids, kth_Bl1 the k-th value, its column kpos_Bl1)."""
    K = min(logits_BlV.shape[-1], top_k + max(16, top_k // 8))
    vals_BlK, idx_BlK = logits_BlV.topk(K, dim=-1, largest=True, sorted=False)
    kth_Bl1, kpos_Bl1 = vals_BlK.kthvalue(K - top_k + 1, dim=-1, keepdim=True)   # the top_k-th largest
    return vals_BlK.masked_fill(vals_BlK < kth_Bl1, -torch.inf), idx_BlK, kth_Bl1, kpos_Bl1


def candidate_weights(vals_BlK: torch.Tensor, top_p: float = 0.0, extra: Optional[Tuple[torch.Tensor, torch.Tensor]]
                      = None) -> torch.Tensor:
    """Unnormalised fp32 probabilities of the candidates (the most likely = 1), zero outside the smallest set whose
    probability reaches top_p (`filter_top_k_top_p_`'s rule; top_p == 0: all kept). extra = (n_Bl1, pos_Bl1):
    n more tokens tie with the smallest candidate, at column pos, which then weighs for its kept ones too."""
    vals_BlK = vals_BlK.float()
    w_BlK = (vals_BlK - vals_BlK.amax(dim=-1, keepdim=True)).exp_()
    n_Bl1, pos_Bl1 = extra if extra is not None else (torch.zeros_like(w_BlK[..., :1]), None)
    w_Bl1 = w_BlK[..., :1] if pos_Bl1 is None else w_BlK.gather(-1, pos_Bl1)
    if top_p <= 0:
        return w_BlK if pos_Bl1 is None else w_BlK.scatter_add(-1, pos_Bl1, n_Bl1 * w_Bl1)
    # the exact rule drops, in ascending order, the tokens whose cumulative mass is <= (1 - top_p) * total: it keeps
    # a token while the mass of the more likely ones is < top_p * total (the most likely one always)
    sorted_BlK, order_BlK = w_BlK.sort(dim=-1, descending=True)
    cum_BlK = sorted_BlK.cumsum(dim=-1)
    bar_Bl1 = top_p * (cum_BlK[..., -1:] + n_Bl1 * w_Bl1)
    kept_sorted_BlK = sorted_BlK.masked_fill_(cum_BlK - sorted_BlK >= bar_Bl1, 0)
    out_BlK = torch.zeros_like(w_BlK).scatter_(-1, order_BlK, kept_sorted_BlK)
    if pos_Bl1 is None:
        return out_BlK
    # the extra ties come last (any order of equal tokens is the rule's): the first ceil(room / w) of them stay
    kept_Bl1 = torch.minimum(((bar_Bl1 - cum_BlK[..., -1:]) / w_Bl1).ceil_().clamp_(min=0), n_Bl1).nan_to_num_(0.0)
    return out_BlK.scatter_add_(-1, pos_Bl1, kept_Bl1 * w_Bl1)


def draw_from_weights(w_BlK: torch.Tensor, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per position with probability w / w.sum() (inverse CDF, one uniform per position): pos_Bl."""
    cum_BlK = w_BlK.cumsum(dim=-1)
    total_Bl1 = cum_BlK[..., -1:]
    u_Bl1 = torch.rand(total_Bl1.shape, generator=rng, device=w_BlK.device)
    # below the total, so the first cum > target exists and has positive weight (zero weights own empty intervals)
    target_Bl1 = torch.minimum(u_Bl1 * total_Bl1, total_Bl1.nextafter(torch.zeros_like(total_Bl1)))
    return torch.searchsorted(cum_BlK, target_Bl1, right=True).squeeze(-1)


def sample_candidates(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng: Rng = None) -> torch.Tensor:
    """`sample_top_k_top_p_`'s distribution drawn over the top-k candidates only (fp32 softmax, another RNG
    stream), leaving logits_BlV as it is: idx_Bl. Without top-k (0 or >= V) it is the exact sampler, in place.
    No host sync, fixed shapes (CUDA graphs): ties with the k-th beyond `first_topk`'s room share the k-th's column.
    Where a top-p cut falls inside a tie group, the kept count is the exact rule's and which ties stand in for
    it is sort order in the exact rule (here: uniform over that column's tokens)."""
    if not 0 < top_k < logits_BlV.shape[-1]:
        return sample_top_k_top_p_(logits_BlV, top_k, top_p, rng)
    if isinstance(rng, list):   # row by row: a row's candidates, hence its draws, do not depend on other rows
        return torch.cat([sample_candidates(logits_BlV[b:b + 1], top_k, top_p, g) for b, g in enumerate(rng)])
    vals_BlK, idx_BlK, kth_Bl1, kpos_Bl1 = first_topk(logits_BlV, top_k)
    # ties with the k-th that the topk had no room for: the k-th's own column stands for them too
    extra_BlV = (logits_BlV == kth_Bl1).scatter_(-1, idx_BlK, False)
    cum_BlV = extra_BlV.cumsum(dim=-1, dtype=torch.int32)
    n_extra_Bl1 = cum_BlV[..., -1:]
    pos_Bl1 = draw_from_weights(candidate_weights(vals_BlK, top_p, (n_extra_Bl1, kpos_Bl1)), rng).unsqueeze(-1)
    # drawn there: the k-th itself or one of those ties, uniformly, from one more uniform
    u_Bl1 = torch.rand(n_extra_Bl1.shape, generator=rng, device=logits_BlV.device)
    r_Bl1 = torch.minimum((u_Bl1 * (n_extra_Bl1 + 1)).int(), n_extra_Bl1)   # u * n can round up to n
    extra_Bl1 = torch.searchsorted(cum_BlV, r_Bl1).clamp_(max=logits_BlV.shape[-1] - 1)   # the first with cumsum r
    pick_Bl1 = torch.where((pos_Bl1 == kpos_Bl1) & (r_Bl1 > 0), extra_Bl1, idx_BlK.gather(-1, pos_Bl1))
    return pick_Bl1.squeeze(-1)


def gumbel_softmax(logits: torch.Tensor, tau: float, rng: Rng = None) -> torch.Tensor:
    """Soft Gumbel-softmax over the last dim, reproducible with a generator (or one per row)."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    if isinstance(rng, list):
        gumbels = torch.stack([-torch.empty_like(logits[b]).exponential_(generator=g).log() for b, g in enumerate(rng)])
    else:
        gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


def random_labels(B: int, num_classes: int, rng: Rng, device) -> torch.Tensor:
    """Uniform class labels (B,), drawn like the official code (per row with per-row generators)."""
    uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
    if isinstance(rng, list):
        return torch.cat([torch.multinomial(uniform, 1, replacement=True, generator=g).view(1) for g in rng])
    return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)


def smooth_tau(ratio: float) -> float:
    """Temperature of the `more_smooth` Gumbel softmax at relative scale position `ratio` in [0, 1]."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)
