"""Learning-rate / weight-decay schedules, progressive-training stages and the weight-decay split.

All arithmetic is in pure functions of the step (`lr_ratio`, `wd_at`, `prog_stage`, `prog_warmup`);
`apply_lr_wd` only writes the values into an optimizer's param groups.
"""
import math
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

# parameters named with any of these (besides 1-D tensors and biases) get no weight decay, as official
NOWD_KEYS = frozenset({'cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                       'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul'})


def lr_ratio(sche: str, cur_it: int, wp_it: float, max_it: int, wp0: float = 0.005, wpe: float = 0.001) -> float:
    """Multiplier of the peak lr at forward step cur_it of max_it: linear warmup from wp0, then `sche` down to wpe.

    sche: 'cos' (half cosine), 'lin' (flat for 15% then linear), 'lin0' (flat for 5% then linear),
    'lin00' (linear), 'lin<T>' (progressive training: slow linear for T, then linear), 'exp' (flat 15%, then
    exponential). The post-warmup fraction is (cur_it - wp_it) / (max_it - 1 - wp_it), as official.
    """
    wp_it = round(wp_it)
    if cur_it < wp_it:
        return wp0 + (1 - wp0) * cur_it / wp_it
    pasd = (cur_it - wp_it) / max(1, max_it - 1 - wp_it)   # 0 -> 1 after warmup
    rest = 1 - pasd
    if sche == 'cos':
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    if sche in ('lin', 'lin0', 'exp'):
        flat = 0.05 if sche == 'lin0' else 0.15
        if pasd < flat:
            return 1.0
        if sche == 'exp':
            return math.exp((pasd - flat) / (1 - flat) * math.log(wpe))
        return wpe + (1 - wpe) * rest / (1 - flat)
    if sche == 'lin00':
        return wpe + (1 - wpe) * rest
    if sche.startswith('lin'):
        try:
            T = float(sche[3:])
        except ValueError:
            raise ValueError(f'unknown lr schedule {sche!r}; use lin0, lin, lin00, lin<T>, cos or exp') from None
        mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2   # lr ratio reached at fraction T
        if pasd < T:
            return 1 + (mid - 1) * pasd / T
        return wpe + (mid - wpe) * rest / (1 - T)
    raise ValueError(f'unknown lr schedule {sche!r}; use lin0, lin, lin00, lin<T>, cos or exp')


def wd_at(wd: float, wd_end: float, cur_it: int, max_it: int) -> float:
    """Weight decay following a half cosine from wd (step 0) to wd_end (step max_it - 1)."""
    pasd = cur_it / max(1, max_it - 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def apply_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float):
    """Set every group's lr (x its 'lr_sc') and weight decay (x its 'wd_sc')."""
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_sc', 1.0)
        g['weight_decay'] = wd * g.get('wd_sc', 1.0)


def no_weight_decay(name: str, param: torch.Tensor, nowd_keys: Iterable[str] = NOWD_KEYS) -> bool:
    """The official rule: 1-D tensors, biases and names containing a no-wd key are not decayed."""
    return param.ndim == 1 or name.endswith('bias') or any(k in name for k in nowd_keys)


def param_groups(model: nn.Module, nowd_keys: Iterable[str] = NOWD_KEYS, allow_frozen: bool = False
                 ) -> Tuple[List[str], List[nn.Parameter], List[Dict]]:
    """(names, params, groups) of the trainable parameters; groups 'D' (decayed) and 'ND' carry wd_sc/lr_sc.
    Frozen parameters are an error, as official, unless allow_frozen (--freeze): then no group holds them."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen and not allow_frozen:
        raise ValueError(f'param_groups expects every parameter trainable; frozen: {frozen[:5]}')
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: Dict[str, Dict] = {}
    for name, p in trained:
        key = 'ND' if no_weight_decay(name, p, nowd_keys) else 'D'
        group = groups.setdefault(key, dict(params=[], names=[], wd_sc=0.0 if key == 'ND' else 1.0, lr_sc=1.0))
        group['params'].append(p)
        group['names'].append(name)
    return [n for n, _ in trained], [p for _, p in trained], list(groups.values())


def prog_stage(g_it: int, wp_it: float, max_it: int, pg: float, pg0: int, num_scales: int) -> int:
    """Progressive training: the last scale index trained at step g_it (-1: all scales, i.e. off); scale pg0 during
    warmup, then growing linearly to the last scale at step pg * max_it, as official."""
    if pg <= 0:
        return -1
    last = num_scales - 1
    if g_it <= wp_it:
        si = pg0
    elif g_it >= max_it * pg:
        si = last
    else:
        progress = min(max((g_it - wp_it) / (max_it * pg - wp_it), 0), 1)
        si = pg0 + round(progress * (last - pg0))
    return -1 if si >= last else si


def prog_warmup(prog_it: int, prog_wp_it: float, first_stage: bool) -> float:
    """Loss weight of the newest scale, ramping up over prog_wp_it steps of a stage (1 in the first stage)."""
    if first_stage:
        return 1.0
    return max(min(prog_it / max(prog_wp_it, 1e-8), 1.0), 0.01)
