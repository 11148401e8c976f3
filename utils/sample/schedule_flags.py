"""Iteration schedules as the sampling tools receive them: from flags, from a benchmark's tokens, from
scripts/convergence.py's JSON; and what a model of a given kind makes of one (a banner's note, the settings that
decide a sampling run's folder). The arithmetic itself is models/schedules.py."""
import json
from typing import List, Optional

from models.schedules import DEFAULT_CAP, OFFICIAL_POINTS, IterSchedule, adaptive, decreasing, explicit
from models.solver import SolverSpec
from utils.cli import int_tuple


def float_list(text: str) -> List[float]:
    """'0.01,0.02' (or '0.01_0.02') -> [0.01, 0.02]."""
    try:
        return [float(t) for t in text.replace('_', ',').split(',') if t.strip()]
    except ValueError:
        raise ValueError(f'expected comma-separated numbers, got {text!r}') from None


def positive_taus(taus: List[float]) -> List[float]:
    """A command line's tau values, which must be > 0 (tau = 0 never stops early: use a fixed schedule)."""
    if any(not t > 0 for t in taus):
        raise ValueError(f'tau must be > 0 (0 never stops early: give a fixed schedule instead), got {list(taus)}')
    return list(taus)


def load_tau_json(path: str, num_scales: int) -> List[float]:
    """Per-scale tau from convergence.py's JSON (key 'suggested_tau'), one value per scale of the model."""
    try:
        with open(path) as f:
            taus = json.load(f).get('suggested_tau')
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path}: {e}') from None
    if not taus:
        raise ValueError(f'{path} has no "suggested_tau" list; run scripts/convergence.py first')
    if len(taus) != num_scales:
        raise ValueError(f'{path} lists {len(taus)} tau values but this model has {num_scales} scales; '
                         f'run scripts/convergence.py on this model')
    return positive_taus([float(t) for t in taus])


def from_cli(num_scales: int, iter_left: int = 10, iter_right: int = 10, iters: str = '',
             tau: str = '', tau_json: str = '', cap: int = 0, stop_mode: str = 'rel') -> IterSchedule:
    """One schedule from the sampling flags; the knob (K-point rule) when nothing else is given."""
    if tau or tau_json:
        taus = load_tau_json(tau_json, num_scales) if tau_json else positive_taus(float_list(tau))
        taus = taus * num_scales if len(taus) == 1 else taus
        caps = list(int_tuple(iters)) if iters else cap or DEFAULT_CAP
        return adaptive(taus, caps, num_scales, stop_mode=stop_mode)
    if iters:
        try:
            return explicit(int_tuple(iters), num_scales)
        except ValueError as e:   # said in the flag's name
            raise ValueError(str(e).replace('an explicit schedule', '--iters')) from None
    return decreasing(iter_left, iter_right, num_scales)


def from_token(token: str, num_scales: int, cap: int = DEFAULT_CAP, tau_json: str = '',
               stop_mode: str = 'rel') -> IterSchedule:
    """One schedule of a benchmark list: 'A:B' (the knob, K-point rule), 'A:B/10' (the official 10-point rule),
    'tau=X' or 'tau=json' (adaptive, per-scale tau from convergence.py's JSON)."""
    token = token.strip()
    if token.startswith('tau='):
        value = token[4:]
        if value == 'json':
            if not tau_json:
                raise ValueError("schedule 'tau=json' needs --tau_json PATH (written by scripts/convergence.py)")
            return adaptive(load_tau_json(tau_json, num_scales), cap, num_scales, stop_mode=stop_mode)
        try:
            taus = positive_taus(float_list(value))
        except ValueError as e:
            raise ValueError(f'bad schedule {token!r}: ' + (str(e) if 'tau' in str(e) else
                                                            'tau must be a number, e.g. tau=0.01')) from None
        if len(taus) != 1:
            raise ValueError(f'bad schedule {token!r}: one tau per token (use tau=json for one per scale)')
        return adaptive(taus[0], cap, num_scales, stop_mode=stop_mode)
    official = token.endswith(f'/{OFFICIAL_POINTS}')
    try:
        a, b = (int(t) for t in token[:-3 if official else None].split(':'))
    except ValueError:
        raise ValueError(f"bad schedule {token!r}: use 'A:B' (e.g. 20:5), 'A:B/10' (official 10-point rule), "
                         f"'tau=0.01' or 'tau=json'") from None
    return decreasing(a, b, num_scales, official=official)


def schedule_note(kind: str, schedule: IterSchedule) -> str:
    """What a model of this kind ('VAR', 'VIAR') does with a schedule, for banners and reports."""
    return f'schedule {schedule.describe()}' if kind == 'VIAR' else 'no implicit block: iteration schedules do nothing'


def schedule_settings(kind: str, schedule: IterSchedule, fill_forward: bool,
                      solver: Optional[SolverSpec] = None) -> dict:
    """The schedule (and solver) values that decide a model's samples, recorded by a sampling folder; {} for VAR."""
    if kind != 'VIAR':
        return {}
    out = dict(counts=list(schedule.counts), tau=schedule.tau, stop_mode=schedule.stop_mode,
               min_iters=schedule.min_iters, fill_forward=fill_forward)
    if solver is not None and solver != SolverSpec():   # the default solver adds no key: older folders still match
        out['solver'] = solver.to_dict()
    return out
