"""models/schedules.py: the official 10-point rounding of the iteration knob, schedule names, and adaptive stopping."""
import pytest
import torch

from models import schedules as S
from models.solver import fixed_point_iterate
from utils.sample import schedule_flags as flags


def test_official_rounding_of_decreasing_schedule():
    assert S.decreasing(10, 5, 10).counts == [10, 9, 8, 8, 7, 7, 6, 6, 5, 5]
    assert S.decreasing(20, 5, 10).counts == [20, 18, 16, 15, 13, 11, 10, 8, 6, 5]
    assert S.constant(10, 10).counts == [10] * 10
    assert flags.from_cli(10, iters='20,18,16,14,12,10,8,6,5,5').counts == [20, 18, 16, 14, 12, 10, 8, 6, 5, 5]
    sch = flags.from_cli(4, tau='0.1', cap=6)
    assert sch.adaptive and sch.tau == [0.1] * 4 and sch.counts == [6] * 4
    with pytest.raises(ValueError, match='one per scale'):
        flags.from_cli(10, iters='3,3')


def test_official_rule_takes_the_first_k_of_ten_points():
    assert S.official_iters(20, 5, 10) == [20, 18, 16, 15, 13, 11, 10, 8, 6, 5]
    assert S.official_iters(20, 5, 4) == [20, 18, 16, 15]    # truncated, not re-spaced
    assert S.official_iters(7, 7, 3) == [7, 7, 7]
    assert S.official_iters(10, 5, 10) == S.linspace_iters(10, 5, 10)   # the two rules agree on 10 scales
    with pytest.raises(ValueError):
        S.official_iters(10, 10, 11)


def test_schedule_names_say_which_rule_and_what_runs():
    k, o = S.decreasing(8, 2, 4), S.decreasing(8, 2, 4, official=True)
    assert k.counts == [8, 6, 4, 2] and o.counts == [8, 7, 6, 6]
    assert k.label() == 'Dec.(8,2)' and o.label() == 'Dec.(8,2)/10'   # two rules, two names
    assert k.describe() == 'Dec.(8,2): 8,6,4,2 iterations per scale'
    assert o.describe() == 'Dec.(8,2)/10: 8,7,6,6 iterations per scale'
    assert S.decreasing(8, 2, 10, official=True).label() == 'Dec.(8,2)'    # no suffix where the rules agree
    assert flags.from_token('8:2/10', 4).counts == o.counts and flags.from_token('8:2', 4).counts == k.counts
    ada = S.adaptive([0.1, 0.05, 0.02, 0.01], 20, 4)
    assert ada.label() == 'Ada.(tau=0.1,0.05,0.02,0.01;cap=20)'       # every tau, not only the last
    assert S.adaptive(0.01, 20, 4).label() == 'Ada.(tau=0.01;cap=20)'
    inc = S.decreasing(0, 4, 4)
    assert inc.label() == 'Inc.(0,4)' and 'scale 1 skips the implicit block' in inc.describe()
    assert 'scales 1,2 skip' in S.explicit([0, 0, 1, 2], 4).describe()


def test_adaptive_stops_where_residual_crosses_tau_and_never_beyond_cap():
    G = lambda z, t: 0.5 * z + 1.0   # residual after t+1 iterations: 0.5**t
    for tau, want in [(0.3, 3), (0.26, 3), (0.126, 4), (0.124, 5), (1.0, 1), (1e-9, 8)]:
        z, st = fixed_point_iterate(G, torch.zeros(1), max_iter=8, tau=tau, stop_mode='abs')
        assert st.iters == want, tau
        assert st.iters == 8 or float(st.residual) <= tau
    _, st = fixed_point_iterate(G, torch.zeros(1), max_iter=8, tau=1.0, stop_mode='abs', min_iter=3)
    assert st.iters == 3
