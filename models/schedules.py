"""Per-scale iteration schedules of the implicit block at inference (pure arithmetic), and their names.

The knob `iter_left, iter_right` becomes counts by `linspace_iters` (this project's, named Dec.(a,b)) or
`official_iters` (the official sampler's, named Dec.(a,b)/10 where it differs; docs/GENERATION.md). Beyond the
knob: an explicit per-scale list, and an adaptive rule that stops a scale once the residual reaches tau. Every tool
prints a schedule with `IterSchedule.describe()`.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

OFFICIAL_POINTS = 10      # the official sampler's linspace always has 10 points
DEFAULT_CAP = 20          # adaptive schedules: iteration cap per scale unless given


def linspace_iters(iter_left: int, iter_right: int, num_scales: int) -> List[int]:
    """This project's knob rule: linspace(left, right, K) truncated to int, e.g. Dec.(10,5) -> 10,9,8,8,7,7,6,6,5,5."""
    return np.linspace(iter_left, iter_right, num_scales, dtype=int).tolist()


def official_iters(iter_left: int, iter_right: int, num_scales: int) -> List[int]:
    """The official sampler's rule: linspace(left, right, 10) truncated to int, then its first K values.

    For K = 10 this equals `linspace_iters`; for K < 10 the official code never reaches iter_right
    (Dec.(8,2) on 4 scales runs 8,7,6,6, where linspace_iters runs 8,6,4,2); K > 10 it cannot run.

    >>> official_iters(8, 2, 4), linspace_iters(8, 2, 4)
    ([8, 7, 6, 6], [8, 6, 4, 2])
    """
    if num_scales > OFFICIAL_POINTS:
        raise ValueError(f'the official iteration knob covers at most {OFFICIAL_POINTS} scales, not {num_scales}')
    return linspace_iters(iter_left, iter_right, OFFICIAL_POINTS)[:num_scales]


def knob_name(iter_left: int, iter_right: int, official: bool = False, num_scales: int = OFFICIAL_POINTS) -> str:
    """Con.(c,c), Dec.(a,b) or Inc.(a,b); the official 10-point rule adds '/10' where it differs (K != 10)."""
    kind = 'Con.' if iter_left == iter_right else 'Dec.' if iter_left > iter_right else 'Inc.'
    suffix = f'/{OFFICIAL_POINTS}' if official and num_scales != OFFICIAL_POINTS and iter_left != iter_right else ''
    return f'{kind}({iter_left},{iter_right}){suffix}'


@dataclass(frozen=True)
class IterSchedule:
    """How many implicit iterations each scale runs: `counts`, or (`tau` set) until the residual ||G(z) - z||
    (over ||G(z)|| when stop_mode == 'rel') is <= tau[k], within [min_iters, counts[k]]. `knob`: the
    (iter_left, iter_right) it came from, if any."""
    counts: List[int]
    tau: Optional[List[float]] = None
    stop_mode: str = 'rel'
    min_iters: int = 1
    name: str = field(default='', compare=False)
    knob: Optional[Tuple[int, int]] = field(default=None, compare=False)

    def __post_init__(self):
        if any(c < 0 for c in self.counts):
            raise ValueError(f'iteration counts must be >= 0, got {self.counts}')
        if self.tau is not None:
            if len(self.tau) != len(self.counts):
                raise ValueError(f'need one tau per scale ({len(self.counts)}), got {len(self.tau)}')
            if any(not t >= 0 for t in self.tau):
                raise ValueError(f'tau must be >= 0 (a residual is never below 0), got {self.tau}')
        if self.stop_mode not in ('rel', 'abs'):
            raise ValueError(f"stop_mode must be 'rel' or 'abs', got {self.stop_mode!r}")
        if self.min_iters < 0:
            raise ValueError(f'min_iters must be >= 0, got {self.min_iters}')

    @property
    def adaptive(self) -> bool:
        return self.tau is not None

    def label(self) -> str:
        """Short human label like the paper's: Con.(10,10), Dec.(20,5), a list or adaptive."""
        if self.name:
            return self.name
        if self.adaptive:
            tau = ','.join(f'{t:g}' for t in dict.fromkeys(self.tau))   # each value once, in order
            cap = str(self.counts[0]) if len(set(self.counts)) == 1 else ','.join(map(str, self.counts))
            return f'Ada.(tau={tau};cap={cap})'
        return 'Iters(' + ','.join(map(str, self.counts)) + ')'

    def describe(self) -> str:
        """The label and what runs, e.g. 'Dec.(8,2): 8,6,4,2 iterations per scale'."""
        counts = ','.join(map(str, self.counts))
        text = f'{self.label()}: ' + (f'up to {counts}' if self.adaptive else counts) + ' iterations per scale'
        if self.adaptive and self.stop_mode == 'abs':
            text += ' (absolute residual)'
        idle = [k + 1 for k, c in enumerate(self.counts) if c == 0]
        if idle:
            who = f'scale {idle[0]} skips' if len(idle) == 1 else f'scales {",".join(map(str, idle))} skip'
            text += f'; {who} the implicit block'
        return text

    def to_dict(self) -> dict:
        """JSON-able form (for reports and child processes)."""
        return dict(counts=list(self.counts), tau=self.tau, stop_mode=self.stop_mode, min_iters=self.min_iters,
                    name=self.label(), knob=list(self.knob) if self.knob else None)

    @classmethod
    def from_dict(cls, d: dict) -> 'IterSchedule':
        return cls(list(d['counts']), tau=d.get('tau'), stop_mode=d.get('stop_mode', 'rel'),
                   min_iters=d.get('min_iters', 1), name=d.get('name', ''),
                   knob=tuple(d['knob']) if d.get('knob') else None)


def constant(c: int, num_scales: int) -> IterSchedule:
    """Con.(c, c)."""
    return decreasing(c, c, num_scales)


def decreasing(a: int, b: int, num_scales: int, official: bool = False) -> IterSchedule:
    """The (a, b) knob under this project's K-point rule, or the official 10-point rule (`official=True`)."""
    rule = official_iters if official else linspace_iters
    return IterSchedule(rule(a, b, num_scales), name=knob_name(a, b, official, num_scales), knob=(a, b))


def explicit(counts: Sequence[int], num_scales: int) -> IterSchedule:
    """An explicit per-scale list, e.g. 20,18,16,14,12,10,8,6,5,5."""
    counts = [int(c) for c in counts]
    if len(counts) != num_scales:
        raise ValueError(f'an explicit schedule needs {num_scales} counts (one per scale), got {len(counts)}: {counts}')
    return IterSchedule(counts)


def adaptive(tau: Union[float, Sequence[float]], cap: Union[int, Sequence[int]], num_scales: int,
             stop_mode: str = 'rel', min_iters: int = 1) -> IterSchedule:
    """Stop each scale when the residual reaches tau (one value or one per scale), at most `cap` iterations."""
    taus = [float(tau)] * num_scales if np.isscalar(tau) else [float(t) for t in tau]
    caps = [int(cap)] * num_scales if np.isscalar(cap) else [int(c) for c in cap]
    if len(caps) != num_scales:
        raise ValueError(f'need one cap per scale ({num_scales}), got {len(caps)}')
    if any(c < 1 for c in caps):
        raise ValueError(f'the adaptive cap must be >= 1 iteration per scale, got {caps}')
    return IterSchedule(caps, tau=taus, stop_mode=stop_mode, min_iters=min_iters)
