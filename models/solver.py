"""Fixed-point solvers z <- G(z, t) with fixed or residual-based stopping, and SOLVERS, the table of them by name.

The contract of G (VIAR's `_scale_map`): iteration t writes KV cache t, so a solver calls G exactly once per
t = 0, 1, ... in order; a second call at one t is an error (models/kv_cache.py IterKVCaches).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class SolveStats:
    """Iterations run and the last residual ||G(z) - z|| (relative or absolute, as requested)."""
    iters: int
    residual: Optional[torch.Tensor]   # 0-dim tensor, kept on device until read


def residual_norm(z_new: torch.Tensor, z_old: torch.Tensor, stop_mode: str = 'rel') -> torch.Tensor:
    """||z_new - z_old||, divided by ||z_new|| in 'rel' mode (as torchdeq's stop modes)."""
    diff = (z_new.float() - z_old.float()).norm()
    return diff / (z_new.float().norm() + 1e-9) if stop_mode == 'rel' else diff


def fixed_point_iterate(G: Callable[[torch.Tensor, int], torch.Tensor], z0: torch.Tensor, max_iter: int,
                        tau: Optional[float] = None, stop_mode: str = 'rel', min_iter: int = 1):
    """Run z_{t+1} = G(z_t, t) for t < max_iter, stopping early once the residual is <= tau.

    Returns (z, SolveStats). Without tau the loop never synchronises with the device and computes
    the residual once, after the last iteration; with tau it reads the residual back every iteration
    (one host-device sync each) to decide whether to stop.

    >>> z, st = fixed_point_iterate(lambda z, t: 0.5 * z + 1, torch.zeros(3), 50, tau=1e-6)
    >>> bool(torch.allclose(z, torch.full((3,), 2.0), atol=1e-5)), st.iters < 50
    (True, True)
    """
    z, res = z0, None
    for t in range(max_iter):
        z_new = G(z, t)
        if tau is not None or t == max_iter - 1:
            res = residual_norm(z_new, z, stop_mode)
        z = z_new
        if tau is not None and t + 1 >= min_iter and res.item() <= tau:
            return z, SolveStats(t + 1, res)
    return z, SolveStats(max_iter, res)


def anderson_iterate(G: Callable[[torch.Tensor, int], torch.Tensor], z0: torch.Tensor, max_iter: int,
                     tau: Optional[float] = None, stop_mode: str = 'rel', min_iter: int = 1,
                     m: int = 5, lam: float = 1e-6, beta: float = 1.0):
    """Anderson acceleration of z <- G(z, t): same arguments, calls and return as `fixed_point_iterate`.

    G is called at an extrapolated point z_{t+1} = sum_i a_i (beta G(z_i) + (1 - beta) z_i) over the last m
    iterates, whose weights a (summing to 1) minimise
    ||sum_i a_i (G(z_i) - z_i)||^2 + lam * mean_i ||G(z_i) - z_i||^2 * ||a||^2.
    Each row of dim 0 is its own problem (rows of a batch do not interact); a row whose system is singular
    (all residuals zero, or equal ones with lam = 0) takes the plain step z_{t+1} = G(z_t). Returns the last
    G output, as the plain iteration does, and synchronises with the device only for tau.
    The mixing runs in float32 (its solve in float64) with autocast off, whatever autocast G runs under: in
    fp16 the Gram matrix of a 2 x 256 x 1920 scale overflows once residuals exceed ~0.36 per element (the row
    then takes plain steps), and in bf16 it has an 8-bit mantissa (docs/SPEED.md measures both).
    Anderson assumes one map G; VIAR's G_t depends on t through its per-iteration KV caches, by an amount
    that shrinks as the earlier scales converge (docs/SPEED.md measures it).

    >>> G = lambda z, t: torch.tensor([[0.9, 0.2], [-0.2, 0.9]]) @ z + 1   # a slow contraction
    >>> _, plain = fixed_point_iterate(G, torch.zeros(2), 500, tau=1e-6)
    >>> z, acc = anderson_iterate(G, torch.zeros(2), 500, tau=1e-6, m=3)
    >>> bool(torch.allclose(z, torch.tensor([6.0, -2.0]), atol=1e-4)), plain.iters, acc.iters
    (True, 153, 5)
    """
    R = z0.shape[0] if z0.dim() > 1 else 1
    z, res = z0, None
    Z_RmN = G_RmN = None   # ring buffers of the last m inputs z_i and outputs G(z_i), float32
    for t in range(max_iter):
        g = G(z, t)
        if tau is not None or t == max_iter - 1:
            res = residual_norm(g, z, stop_mode)
        if t == max_iter - 1 or (tau is not None and t + 1 >= min_iter and res.item() <= tau):
            return g, SolveStats(t + 1, res)
        n = min(t + 1, m)
        with torch.autocast(z0.device.type, enabled=False):
            g_RN = g.reshape(R, -1).float()
            if Z_RmN is None:
                Z_RmN, G_RmN = g_RN.new_zeros(R, m, g_RN.shape[1]), g_RN.new_zeros(R, m, g_RN.shape[1])
            Z_RmN[:, t % m], G_RmN[:, t % m] = z.reshape(R, -1).float(), g_RN
            if n == 1:
                z = g
                continue
            F_RnN = G_RmN[:, :n] - Z_RmN[:, :n]
            H_Rnn = (F_RnN @ F_RnN.transpose(1, 2)).double()   # residuals span decades: solve in float64
            H_Rnn.diagonal(dim1=1, dim2=2).add_(lam * H_Rnn.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True))
            A = H_Rnn.new_zeros(R, n + 1, n + 1)   # the bordered system [[0, 1^T], [1, H]] [mu, a] = [1, 0]
            A[:, 0, 1:] = A[:, 1:, 0] = 1
            A[:, 1:, 1:] = H_Rnn
            rhs = H_Rnn.new_zeros(R, n + 1)
            rhs[:, 0] = 1
            sol, info = torch.linalg.solve_ex(A, rhs)
            ok_R1 = ((info == 0) & sol.isfinite().all(-1))[:, None]
            z_RN = (sol[:, None, 1:].float() @ (beta * G_RmN[:, :n] + (1 - beta) * Z_RmN[:, :n])).squeeze(1)
            z = torch.where(ok_R1, z_RN, g_RN).view_as(g).to(g.dtype)
    return z, SolveStats(0, None)   # max_iter == 0


@dataclass(frozen=True)
class Option:
    """One option of a solver: its default, the check a value must pass (`rule` says it in words), its meaning."""
    default: float
    ok: Callable[[float], bool]
    rule: str
    doc: str


@dataclass(frozen=True)
class Solver:
    """A row of SOLVERS: solve(G, z0, max_iter, tau, stop_mode, min_iter, **options) -> (z, stats) with the contract
    of `fixed_point_iterate` (G called once per t = 0, 1, ... in order), one line on what it is, and its options."""
    solve: Callable
    doc: str
    options: Dict[str, Option] = field(default_factory=dict)


# every solver the sampler can use, by name: the sampling flags, the benchmarks and the banners read this table
SOLVERS: Dict[str, Solver] = {
    'picard': Solver(fixed_point_iterate, 'plain iteration z <- G(z), the official sampler'),
    'anderson': Solver(anderson_iterate, 'Anderson acceleration: fewer iterations to a tight tau (docs/SPEED.md)',
                       dict(m=Option(5, lambda v: v >= 2, '>= 2', 'history size'),
                            lam=Option(1e-6, lambda v: v >= 0, '>= 0', 'regularisation, relative to the mean '
                                                                       'squared residual'),
                            beta=Option(1.0, lambda v: 0 < v <= 1, 'in (0, 1]', 'mixing'))),
}


class SolverSpec:
    """How VIAR solves each scale's fixed point when sampling: a SOLVERS name and its options (the rest default).

    >>> SolverSpec('anderson', m=3)
    SolverSpec('anderson', m=3, lam=1e-06, beta=1.0)
    """

    def __init__(self, kind: str = 'picard', **options: float):
        if kind not in SOLVERS:
            raise ValueError(f'unknown solver {kind!r}: choose from {", ".join(SOLVERS)}')
        known = SOLVERS[kind].options
        unknown = sorted(options.keys() - known.keys())
        if unknown:
            raise ValueError(f'solver {kind} has no option {unknown[0]!r} (its options: {", ".join(known) or "none"})')
        self.kind = kind
        self.options = {name: options.get(name, o.default) for name, o in known.items()}
        for name, value in self.options.items():
            if not known[name].ok(value):
                raise ValueError(f'{kind} needs {name} {known[name].rule}, got {name}={value}')

    def to_dict(self) -> dict:
        """{'kind': name, option: value, ...}: JSON-able, and `SolverSpec(**d)` rebuilds it."""
        return dict(kind=self.kind, **self.options)

    def __eq__(self, other) -> bool:
        return isinstance(other, SolverSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __str__(self) -> str:
        """'picard', 'anderson m=5 lam=1e-06 beta=1': for banners and logs."""
        return ' '.join([self.kind] + [f'{k}={v:g}' for k, v in self.options.items()])

    def __repr__(self) -> str:
        return f'SolverSpec({self.kind!r}' + ''.join(f', {k}={v!r}' for k, v in self.options.items()) + ')'

    def solve(self, G: Callable[[torch.Tensor, int], torch.Tensor], z0: torch.Tensor, **kw):
        """(z, SolveStats) from z0; kw as `fixed_point_iterate` (max_iter, tau, stop_mode, min_iter)."""
        return SOLVERS[self.kind].solve(G, z0, **self.options, **kw)
