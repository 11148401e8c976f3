"""Scale layout of the token pyramid: pure functions of `patch_nums`.

Shapes: K = number of scales, L = sum(pn**2) tokens over all scales.
"""
from typing import List, Sequence, Tuple

import torch

# the official token pyramids by image side (VAR's --pn 256 / 512 / 1024)
PYRAMIDS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
            1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)}


def scale_begin_ends(patch_nums: Sequence[int]) -> List[Tuple[int, int]]:
    """Token range [begin, end) of each scale in the flattened sequence."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return out


def num_tokens(patch_nums: Sequence[int]) -> int:
    """L: total number of tokens over all scales."""
    return sum(pn * pn for pn in patch_nums)


def level_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) scale index of every token."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> torch.Tensor:
    """(1, 1, L, L) additive mask: a token sees every token of its own and earlier scales."""
    lvl_L = level_ids(patch_nums)
    visible_LL = lvl_L.view(-1, 1) >= lvl_L.view(1, -1)
    return torch.where(visible_LL, 0.0, -torch.inf).view(1, 1, len(lvl_L), len(lvl_L))
