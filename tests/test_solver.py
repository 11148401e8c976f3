"""Faster fixed points: Anderson acceleration (models/solver.py) and the study behind it (bench/fixed_point.py)."""
import doctest

import pytest
import torch

from bench import fixed_point as fp
from models import schedules as S
from models import solver
from models.solver import SolveStats, SolverSpec, anderson_iterate, fixed_point_iterate
from tests.tiny import tiny_vae_var


def linear_contraction(R: int, N: int, radius: float, seed: int = 0):
    """G(z) = A z + b per row, A with spectral norm `radius`; returns (G, the exact fixed point)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(R, N, N, generator=g, dtype=torch.float64))
    A = (radius * Q).float()                       # orthogonal times radius: a slow rotation-like contraction
    b = torch.randn(R, N, generator=g)
    z_star = torch.linalg.solve(torch.eye(N) - A, b)
    return (lambda z, t: (A @ z.unsqueeze(-1)).squeeze(-1) + b), z_star


def test_solver_doctests_run():
    assert doctest.testmod(solver).failed == 0


@pytest.mark.parametrize('radius', [0.5, 0.9])
def test_anderson_reaches_the_fixed_point_in_fewer_iterations_than_picard(radius):
    G, z_star = linear_contraction(R=3, N=12, radius=radius)
    z0 = torch.zeros_like(z_star)
    zp, plain = fixed_point_iterate(G, z0, 500, tau=1e-5)
    za, acc = anderson_iterate(G, z0, 500, tau=1e-5, m=5)
    assert plain.iters < 500 and acc.iters < plain.iters
    for z in (zp, za):
        assert torch.allclose(z, z_star, atol=1e-3, rtol=1e-3)


def test_G_is_called_once_per_iteration_index_in_order():
    G, z_star = linear_contraction(R=2, N=6, radius=0.8)
    for tau in (None, 1e-4):
        seen = []
        _, st = anderson_iterate(lambda z, t: (seen.append(t), G(z, t))[1], torch.zeros_like(z_star), 40, tau=tau)
        assert seen == list(range(st.iters)) and (tau is not None or st.iters == 40)
    assert anderson_iterate(G, torch.zeros_like(z_star), 0)[1].iters == 0


def test_singular_least_squares_falls_back_to_the_plain_step():
    d = torch.tensor([[1.0, -2.0, 0.5]])
    shift = lambda z, t: z + d                     # every residual equals d: the system is singular with lam = 0
    z_plain, _ = fixed_point_iterate(shift, torch.zeros(1, 3), 6)
    z_acc, st = anderson_iterate(shift, torch.zeros(1, 3), 6, lam=0.0)
    assert torch.equal(z_acc, z_plain) and st.iters == 6
    z0 = torch.randn(2, 3)
    z_id, _ = anderson_iterate(lambda z, t: z.clone(), z0, 5)   # zero residuals: singular for any lam
    assert torch.equal(z_id, z0)


def test_rows_are_separate_problems_and_a_singular_row_does_not_touch_the_others():
    G, z_star = linear_contraction(R=1, N=3, radius=0.9)
    d = torch.tensor([1.0, -2.0, 0.5])
    both = lambda z, t: torch.stack((z[0] + d, G(z[1:], t)[0]))   # row 0 singular, row 1 a contraction
    z, _ = anderson_iterate(both, torch.zeros(2, 3), 12, lam=0.0)
    alone, _ = anderson_iterate(G, torch.zeros(1, 3), 12, lam=0.0)
    assert torch.equal(z[0], 12 * d) and torch.allclose(z[1], alone[0], atol=1e-6)


def test_solver_spec_rejects_nonsense():
    for bad in (dict(kind='newton'), dict(kind='anderson', m=1), dict(beta=0.0), dict(lam=-1.0),
                dict(kind='anderson', beta=1.5), dict(kind='anderson', k=3)):
        with pytest.raises(ValueError):
            SolverSpec(**bad)
    spec = SolverSpec('anderson', m=3)
    assert SolverSpec(**spec.to_dict()) == spec != SolverSpec('anderson')
    assert str(spec) == 'anderson m=3 lam=1e-06 beta=1' and str(SolverSpec()) == 'picard'


# ---------------------------------------------------------------- on a tiny VIAR

def implicit_calls(var):
    """Record (scale length, KV cache object, its length before the call) for every implicit-block call."""
    calls = []
    handle = var.implicit_block.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[1], args[3], args[3].length)))
    return calls, handle


@pytest.mark.parametrize('schedule', [S.constant(5, 4), S.adaptive(1e-3, 6, 4)])
def test_anderson_writes_each_iteration_cache_once_per_scale_in_order(schedule):
    _, var = tiny_vae_var(True)
    calls, handle = implicit_calls(var)
    try:
        _, stats = var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=schedule, solver=SolverSpec('anderson', m=3),
                                                return_stats=True)
    finally:
        handle.remove()
    order = []   # cache objects by first use = iteration index
    begin = 0
    for si, pn in enumerate(var.patch_nums):
        at_scale = [(kv, n) for l, kv, n in calls if l == pn * pn]
        assert len(at_scale) == stats.iters[si]
        for t, (kv, n) in enumerate(at_scale):
            if kv not in order:
                order.append(kv)
            assert order.index(kv) == t and n == begin   # iteration t uses cache t, which holds only earlier scales
        begin += pn * pn


class TwiceAtOneT:
    """A solver that breaks the contract of G: it calls G(z, 1) twice at every scale."""

    def solve(self, G, z0, max_iter, **kw):
        z = G(G(z0, 0), 1)
        return G(z, 1), SolveStats(3, None)


@pytest.mark.parametrize('schedule', [S.constant(3, 4), S.adaptive(1e-3, 3, 4)])
@pytest.mark.parametrize('fill_forward', [True, False])
def test_a_solver_calling_G_twice_at_one_t_is_refused(schedule, fill_forward):
    _, var = tiny_vae_var(True)
    with pytest.raises(RuntimeError, match='iteration 1 of scale 0 asked for its KV cache twice'):
        var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=schedule, fill_forward=fill_forward,
                                     solver=TwiceAtOneT())


def test_every_registered_solver_keeps_the_contract_of_G():
    G, z_star = linear_contraction(R=2, N=6, radius=0.8)
    for name, row in solver.SOLVERS.items():
        assert row.doc and all(o.ok(o.default) for o in row.options.values()), name
        for tau in (None, 1e-4):
            seen = []
            z, st = SolverSpec(name).solve(lambda z, t: (seen.append(t), G(z, t))[1], torch.zeros_like(z_star),
                                           max_iter=60, tau=tau)
            assert seen == list(range(st.iters)), name
        assert torch.allclose(z, z_star, atol=1e-3, rtol=1e-3), name


class HandPicard:
    """The plain iteration written out here, independent of models/solver.py: z <- G(z, t) for t < max_iter,
    stopping after iteration t + 1 >= min_iter once ||z_new - z|| / ||z_new|| <= tau."""

    def __init__(self):
        self.calls = []

    def solve(self, G, z0, max_iter, tau=None, stop_mode='rel', min_iter=1):
        assert stop_mode == 'rel'
        z, res, n = z0, None, 0
        while n < max_iter:
            z_new = G(z, n)
            res = (z_new.float() - z.float()).norm() / (z_new.float().norm() + 1e-9)
            z, n = z_new, n + 1
            if tau is not None and n >= min_iter and res.item() <= tau:
                break
        self.calls.append(n)
        return z, SolveStats(n, res)


@pytest.mark.parametrize('schedule', [S.constant(3, 4), S.decreasing(5, 2, 4), S.adaptive(0.05, 6, 4)])
def test_default_solver_is_bit_identical_to_the_plain_iteration(schedule):
    """No solver and SolverSpec() give exactly the samples of the plain iteration written in the test."""
    _, var = tiny_vae_var(True)
    kw = dict(g_seed=3, cfg=1.5, top_k=10, top_p=0.9, schedule=schedule)
    hand = HandPicard()
    want, want_stats = var.autoregressive_infer_cfg(3, 2, solver=hand, return_stats=True, **kw)
    assert want_stats.iters == hand.calls and (schedule.adaptive or hand.calls == schedule.counts)
    for solver in (None, SolverSpec()):
        got, stats = var.autoregressive_infer_cfg(3, 2, solver=solver, return_stats=True, **kw)
        assert torch.equal(got, want) and stats.iters == want_stats.iters
    if schedule.adaptive:
        assert len(set(hand.calls)) > 1, f'tau stops every scale alike ({hand.calls}): the test needs another tau'
    _, var = tiny_vae_var(False)   # VAR has no implicit block: any solver is ignored
    plain = var.autoregressive_infer_cfg(3, 2, **kw)
    assert torch.equal(var.autoregressive_infer_cfg(3, 2, solver=SolverSpec('anderson'), **kw), plain)


# ---------------------------------------------------------------- the study (bench/fixed_point.py)

def test_study_records_through_the_model_hooks_without_changing_the_samples():
    vae, var = tiny_vae_var(True)
    kw = dict(cfg=1.5, top_k=0, top_p=0.0)
    labels, seeds = torch.tensor([1, 3]), [5, 6]
    for schedule in (S.constant(4, 4), S.adaptive(1e-2, 6, 4)):
        for solver in (SolverSpec(), SolverSpec('anderson', m=3)):
            alone = var.autoregressive_infer_cfg(2, labels, g_seed=seeds, schedule=schedule, solver=solver, **kw)
            img, stats, rec, _ = fp.run_once(var, vae, solver, schedule, labels, seeds, **kw)
            assert torch.equal(img, alone)
            assert [len(r) for r in rec.residuals] == stats.iters            # one record per implicit iteration
            assert [t.shape[1] for t in rec.tokens] == [pn * pn for pn in var.patch_nums]
            assert all(z.shape[1] == pn * pn for z, pn in zip(rec.z, var.patch_nums))
            assert rec.logits[-1].shape[1] == var.patch_nums[-1] ** 2
            if schedule.adaptive:   # the sampler stops on the same residual the hook recomputes
                assert all(r[-1] == pytest.approx(s, rel=1e-4) for r, s in zip(rec.residuals, stats.residuals))
    _, var_explicit = tiny_vae_var(False)
    with pytest.raises(SystemExit, match='VIAR'):
        fp.check_viar(var_explicit, 'tiny VAR')


def test_equal_distance_arithmetic():
    assert fp.interp_at([1e-3, 1e-1], [10, 2], 1e-2) == pytest.approx(6.0)
    assert fp.interp_at([1e-3, 1e-1], [10, 2], 1.0) is None
    pts = [dict(distance=d, it=i, schedule=str(d)) for d, i in ((1e-1, 4), (1e-2, 8), (5e-2, 9), (1e-3, 12))]
    assert [p['distance'] for p in fp.frontier(pts, 'it')] == [1e-3, 1e-2, 1e-1]
    base = [dict(distance=1e-2, it=10, schedule='tau')]
    assert fp.at_equal_distance(base, pts, 'it')[0]['other'] == pytest.approx(8.0)
    assert fp.parse_options('picard, anderson', m=3) == [('picard', SolverSpec()),
                                                         ('anderson', SolverSpec('anderson', m=3))]
    for bad in ('broyden', 'warm', 'anderson+warm'):
        with pytest.raises(ValueError):
            fp.parse_options(bad)


def test_benchmark_runs_end_to_end_on_random_weights(tmp_path):
    out = fp.main(['--var_ckpt', 'random', '--per_class', '1', '--taus', '0.1,0.01', '--counts', '2', '--reps', '0',
                   '--ref_iters', '6', '--cap', '6', '--options', 'picard,anderson', '--m', '3',
                   '--out', str(tmp_path)])
    assert {r['option'] for r in out['rows']} == {'picard', 'anderson'}
    assert all(len(r['iters']) == 4 and r['distance'] >= 0 for r in out['rows'])
    assert set(out['equal_distance']) == {'anderson'}
    for name in ('fixed_point.json', 'fixed_point.md', 'fixed_point.png'):
        assert (tmp_path / name).stat().st_size > 0
