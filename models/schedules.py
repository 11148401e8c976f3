"""Per-scale iteration schedules of the implicit block at inference (pure arithmetic).

The official knob is `iter_left, iter_right`: counts = linspace(left, right, K) cast to int
(numpy truncation), so Con.(c, c) and Dec.(a, b) are both this knob. Beyond it: an explicit
per-scale list, and an adaptive rule that stops a scale once the residual reaches `tau`.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np


def linspace_iters(iter_left: int, iter_right: int, num_scales: int) -> List[int]:
    """Official schedule: np.linspace(left, right, K) truncated to int, e.g. Dec.(10,5) -> 10,9,8,8,7,7,6,6,5,5."""
    return np.linspace(iter_left, iter_right, num_scales, dtype=int).tolist()


@dataclass(frozen=True)
class IterSchedule:
    """How many implicit iterations each scale runs.

    fixed: `counts` per scale. adaptive (`tau` set): iterate until the residual
    ||G(z) - z|| (divided by ||G(z)|| when stop_mode == 'rel') is <= tau[k], at least
    `min_iters` and at most `counts[k]` (the cap) iterations.
    """
    counts: List[int]
    tau: Optional[List[float]] = None
    stop_mode: str = 'rel'
    min_iters: int = 1
    name: str = field(default='', compare=False)

    def __post_init__(self):
        if any(c < 0 for c in self.counts):
            raise ValueError(f'iteration counts must be >= 0, got {self.counts}')
        if self.tau is not None and len(self.tau) != len(self.counts):
            raise ValueError(f'need one tau per scale ({len(self.counts)}), got {len(self.tau)}')
        if self.stop_mode not in ('rel', 'abs'):
            raise ValueError(f"stop_mode must be 'rel' or 'abs', got {self.stop_mode!r}")

    @property
    def adaptive(self) -> bool:
        return self.tau is not None

    @property
    def max_iters(self) -> int:
        return max(self.counts) if self.counts else 0

    def label(self) -> str:
        """Short human label like the paper's: Con.(10,10), Dec.(20,5), list or adaptive."""
        if self.name:
            return self.name
        if self.adaptive:
            return f'Ada.(tau={self.tau[-1]:g},cap={self.max_iters})'
        return 'Iters(' + ','.join(map(str, self.counts)) + ')'


def constant(c: int, num_scales: int) -> IterSchedule:
    """Con.(c, c)."""
    return IterSchedule(linspace_iters(c, c, num_scales), name=f'Con.({c},{c})')


def decreasing(a: int, b: int, num_scales: int) -> IterSchedule:
    """Dec.(a, b) with the official rounding (also any linspace knob)."""
    kind = 'Con.' if a == b else 'Dec.' if a > b else 'Inc.'
    return IterSchedule(linspace_iters(a, b, num_scales), name=f'{kind}({a},{b})')


def explicit(counts: Sequence[int], num_scales: int) -> IterSchedule:
    """An explicit per-scale list, e.g. 20,18,16,14,12,10,8,6,5,5."""
    counts = [int(c) for c in counts]
    if len(counts) != num_scales:
        raise ValueError(f'--iters needs {num_scales} counts (one per scale), got {len(counts)}: {counts}')
    return IterSchedule(counts)


def adaptive(tau: Union[float, Sequence[float]], cap: Union[int, Sequence[int]], num_scales: int,
             stop_mode: str = 'rel', min_iters: int = 1) -> IterSchedule:
    """Stop each scale when the residual reaches tau (one value or one per scale), at most `cap` iterations."""
    taus = [float(tau)] * num_scales if np.isscalar(tau) else [float(t) for t in tau]
    caps = [int(cap)] * num_scales if np.isscalar(cap) else [int(c) for c in cap]
    if len(caps) != num_scales:
        raise ValueError(f'need one cap per scale ({num_scales}), got {len(caps)}')
    return IterSchedule(caps, tau=taus, stop_mode=stop_mode, min_iters=min_iters)


def parse_int_list(text: str) -> List[int]:
    """'20,18,16' or '20_18_16' -> [20, 18, 16]."""
    return [int(t) for t in text.replace('_', ',').split(',') if t.strip()]


def parse_float_list(text: str) -> List[float]:
    """'0.01,0.02' -> [0.01, 0.02]."""
    return [float(t) for t in text.replace('_', ',').split(',') if t.strip()]


def from_cli(num_scales: int, iter_left: int = 10, iter_right: int = 10, iters: str = '',
             tau: str = '', tau_json: str = '', cap: int = 0, stop_mode: str = 'rel') -> IterSchedule:
    """One schedule from the sampling scripts' flags; the official knob when nothing else is given."""
    if tau or tau_json:
        taus = load_tau_json(tau_json, num_scales) if tau_json else parse_float_list(tau)
        taus = taus * num_scales if len(taus) == 1 else taus
        caps = parse_int_list(iters) if iters else [cap or max(iter_left, iter_right)] * num_scales
        return adaptive(taus, caps, num_scales, stop_mode=stop_mode)
    if iters:
        return explicit(parse_int_list(iters), num_scales)
    return decreasing(iter_left, iter_right, num_scales)


def load_tau_json(path: str, num_scales: int) -> List[float]:
    """Per-scale tau from convergence.py's JSON (key 'suggested_tau')."""
    import json
    with open(path) as f:
        taus = json.load(f).get('suggested_tau')
    if not taus or len(taus) != num_scales:
        raise ValueError(f'{path} has no "suggested_tau" list of {num_scales} values; run scripts/convergence.py first')
    return [float(t) for t in taus]
