"""utils/train/policy.py: the step policy, a pure function of the step (when to log, validate, save; the schedule)."""
import pytest


def _policy(**kw):
    from utils.train.policy import StepPolicy
    base = dict(total=12, iters_ep=4, ac=1, peak_lr=1.0, wd=0.05, wd_end=0.05, sche='lin0', wp_it=2.0, wp0=0.5,
                wpe=0.01, pg=0.0, pg0=4, num_scales=10, save_freq=2, save_every_steps=0, val_every=0, log_every=5)
    base.update(kw)
    return StepPolicy(**base)


def _run_events(policy, start=0):
    """(done, Events) for every forward pass of a run started at `start`."""
    from utils.train.policy import Pending
    out, pending = [], Pending()
    for g_it in range(start, policy.total):
        ev, pending = policy.events_at(g_it + 1, pending, first=g_it == start)
        out.append((g_it + 1, ev))
    return out


def test_policy_saves_every_save_freq_epochs_and_at_the_end_logs_on_schedule():
    ev = dict(_run_events(_policy()))
    assert [d for d, e in ev.items() if e.save] == [8, 12] == [d for d, e in ev.items() if e.validate]
    assert [d for d, e in ev.items() if e.log] == [1, 5, 10, 12]     # first, every 5, last
    assert [d for d, e in _run_events(_policy(), start=6) if e.log] == [7, 10, 12]   # a resume logs at once


def test_policy_defers_events_inside_an_accumulation_window_to_its_end():
    ev = dict(_run_events(_policy(total=12, iters_ep=4, ac=3, save_freq=1)))
    # epoch ends at 4 and 8 fall inside windows (3 forward passes per step): done at 6 and 9, and at the end
    assert [d for d, e in ev.items() if e.save] == [6, 9, 12]
    assert all(d % 3 == 0 for d, e in ev.items() if e.save or e.validate)
    ev = dict(_run_events(_policy(total=16, iters_ep=100, ac=2, save_freq=100, save_every_steps=2, val_every=6)))
    assert [d for d, e in ev.items() if e.save] == [4, 8, 12, 16]    # every 2 optimizer steps, and the end
    assert [d for d, e in ev.items() if e.validate] == [6, 12, 16]


def test_policy_schedule_warms_up_steps_on_window_ends_and_stages_progressively():
    p = _policy(ac=2)
    assert p.schedule_at(0).lr == pytest.approx(0.5) and p.schedule_at(2).lr == pytest.approx(1.0)
    assert [p.schedule_at(g).stepping for g in range(4)] == [False, True, False, True]
    q = _policy(total=100, pg=0.5, pg0=2, wp_it=10)
    stages = [q.schedule_at(g).prog_si for g in range(100)]
    assert stages[0] == 2 and stages[-1] == -1 and stages == sorted(stages, key=lambda s: 99 if s < 0 else s)
