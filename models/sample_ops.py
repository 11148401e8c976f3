"""Token sampling arithmetic: CFG ratio, top-k / top-p filtering, seeded Gumbel softmax.

Shapes: B batch, l tokens of the current scale, V vocabulary.
"""
from typing import List, Optional, Sequence, Union

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
    """None (global RNG), one generator for the batch (an int seed, as official), or one per row (a list).

    Per-row generators make a row's draws independent of the rest of the batch, so batching
    seeds gives the same images as one call per seed; [s] draws exactly what s draws for B=1.
    """
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
