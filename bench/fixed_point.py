"""Fewer iterations for the same fixed point (a benchmark, not a test): plain iteration against Anderson acceleration.

On one trained VIAR, each solver of `--options` samples under each schedule, forced onto the tokens of a reference run
of `--ref_iters` plain iterations per scale; distance at scale k: ||z_k - z_k^ref|| / ||z_k^ref|| of the implicit
block's output. Watched through public hooks only. Writes OUT/fixed_point.{json,md,png}; docs/SPEED.md explains.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __name__ == '__main__':   # `python bench/fixed_point.py`: the project root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import measure  # noqa: E402
from models import EditSpec, schedules as S  # noqa: E402
from models.config import ModelSpec  # noqa: E402
from models.solver import SOLVERS, SolverSpec  # noqa: E402
from utils import cli  # noqa: E402
from utils.arch_flags import describe_model  # noqa: E402
from utils.atomic import check_writable  # noqa: E402
from utils.cli import flag  # noqa: E402
from utils.model_io import load_models  # noqa: E402


# ---------------------------------------------------------------- options and arithmetic (pure)

def parse_options(text: str, m: int = 5, lam: float = 1e-6, beta: float = 1.0) -> List[Tuple[str, SolverSpec]]:
    """'picard,anderson' -> [(name, SolverSpec)]; m, lam, beta go to the solvers that take them (Anderson)."""
    given, out = dict(m=m, lam=lam, beta=beta), []
    for name in (t.strip() for t in text.split(',') if t.strip()):
        if name not in SOLVERS:
            raise ValueError(f'unknown solver {name!r}: choose from {", ".join(SOLVERS)}')
        out.append((name, SolverSpec(name, **{k: v for k, v in given.items() if k in SOLVERS[name].options})))
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements."""
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()


def interp_at(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """y at x, linear in log(x) between the nearest points that bracket it; None outside the measured range."""
    pts = sorted((a, b) for a, b in zip(xs, ys) if a > 0)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return min(y0, y1)
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return next((b for a, b in pts if a == x), None)


def frontier(points: Sequence[Dict[str, Any]], key: str, sign: float = 1.0) -> List[Dict[str, Any]]:
    """The points no other point beats on both a smaller distance and a smaller sign * point[key]."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda p: (p['distance'], sign * p[key])):
        if sign * p[key] < best:
            out.append(p)
            best = sign * p[key]
    return out


def at_equal_distance(base: Sequence[Dict[str, Any]], other: Sequence[Dict[str, Any]], key: str,
                      sign: float = 1.0) -> List[Dict[str, Any]]:
    """For each base point: the other option's `key` at its distance, interpolated on the other's frontier (sign 1:
    smaller is better; -1: larger is); None where the other's points do not bracket that distance."""
    fr = frontier(other, key, sign)
    return [dict(schedule=p['schedule'], distance=p['distance'], base=p[key],
                 other=interp_at([q['distance'] for q in fr], [q[key] for q in fr], p['distance'])) for p in base]


# ---------------------------------------------------------------- recording a sampling call through hooks

def check_viar(var, where: str):
    """SystemExit unless `var` has an implicit block to watch (the model's own hook says whether it has)."""
    try:
        var.register_iterate_hook(lambda z_t, z_next: None).remove()
    except ValueError as e:
        raise SystemExit(f'{where}: {e}') from None


class Recorder:
    """Per scale of one sampling call: the tokens (the embedding lookup's input) and, with iterates, the last implicit
    iterate, the logits and each iteration's residual ||G(z) - z|| / ||G(z)|| (z: the point the step started from)."""

    def __init__(self, var, vae, iterates: bool = True):
        self.scale_of_len = {pn * pn: si for si, pn in enumerate(var.patch_nums)}
        K = len(var.patch_nums)
        self.z: List[Optional[torch.Tensor]] = [None] * K
        self.logits: List[Optional[torch.Tensor]] = [None] * K
        self.residuals: List[List[float]] = [[] for _ in range(K)]
        self.tokens: List[torch.Tensor] = []
        self._hooks = [vae.quantize.embedding.register_forward_pre_hook(self._tokens)]
        if iterates:
            self._hooks += [var.register_iterate_hook(self._iterate), var.head.register_forward_hook(self._head)]

    def _iterate(self, z_t, z_next):
        si = self.scale_of_len[z_next.shape[1]]
        self.z[si] = z_next.detach().clone()
        self.residuals[si].append(((z_next - z_t).float().norm() / (z_next.float().norm() + 1e-9)).item())

    def _head(self, module, args, out):
        self.logits[self.scale_of_len[out.shape[1]]] = out.detach().clone()

    def _tokens(self, module, args):
        self.tokens.append(args[0].clone())

    def remove(self):
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def run_once(var, vae, solver: SolverSpec, schedule, labels, seeds, cfg, top_k, top_p, edit=None,
             iterates: bool = True):
    """One sampling call; returns (images, SampleStats, Recorder, process CPU seconds)."""
    rec = Recorder(var, vae, iterates)
    try:
        t0 = time.process_time()
        img, stats = var.autoregressive_infer_cfg(len(seeds), labels, g_seed=list(seeds), cfg=cfg, top_k=top_k,
                                                  top_p=top_p, schedule=schedule, edit=edit, return_stats=True,
                                                  solver=solver)
        cpu_s = time.process_time() - t0
    finally:
        rec.remove()
    return img, stats, rec, cpu_s


def timed(var, vae, solver, schedule, labels, seeds, reps: int, **common) -> Dict[str, Any]:
    """Process-CPU times of `reps` free-running calls after one warm-up (reps 0: the warm-up's), the last's tokens."""
    times = []
    for r in range(max(reps, 0) + 1):
        img, stats, rec, cpu_s = run_once(var, vae, solver, schedule, labels, seeds, iterates=False, **common)
        if r or not reps:
            times.append(cpu_s)
    return dict(cpu_s=times, images_per_s=len(seeds) / min(times), tokens=rec.tokens, img=img, iters=stats.iters)


# ---------------------------------------------------------------- the study

def load(args):
    """(vae, var) on the CPU: a trained VIAR as its file configures it, or (`--var_ckpt random`) a tiny random one."""
    if args.var_ckpt == 'random':
        torch.manual_seed(args.seed)
        vae, var = ModelSpec(depth=4, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                             patch_nums=(1, 2, 3, 4), V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1),
                             vae_num_res_blocks=1, num_classes=5).build('cpu')
    else:
        vae, var, _ = load_models(args.var_ckpt, args.vae_ckpt or None, device='cpu')
    check_viar(var, args.var_ckpt)
    return vae.eval(), var.eval()


def study(vae, var, args, options: List[Tuple[str, SolverSpec]]) -> Dict[str, Any]:
    """The reference, then every solver of `options` under every schedule: the JSON-able result."""
    K = len(var.patch_nums)
    labels = torch.arange(var.num_classes).repeat_interleave(args.per_class)
    seeds = list(range(args.first_seed, args.first_seed + len(labels)))
    common = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)

    ref_sched = S.constant(args.ref_iters, K)
    _, ref_stats, ref, _ = run_once(var, vae, SolverSpec(), ref_sched, labels, seeds, **common)
    edit = EditSpec(gt_idx_Bl=ref.tokens, keep_Bl=[torch.ones_like(t, dtype=torch.bool) for t in ref.tokens])
    out: Dict[str, Any] = dict(reference=dict(schedule=ref_sched.label(), residual_last_iter=ref_stats.residuals,
                                              residual_curves=ref.residuals), rows=[])

    taus = [float(t) for t in args.taus.split(',')]
    schedules = [(f'tau={tau:g}', S.adaptive(tau, args.cap, K)) for tau in taus]
    schedules += [(f'Con.({c},{c})', S.constant(c, K)) for c in args.counts]
    weights = [pn * pn for pn in var.patch_nums]   # an iteration at scale k costs about its tokens
    for name, solver in options:
        for label, sched in schedules:
            _, st, rec, _ = run_once(var, vae, solver, sched, labels, seeds, edit=edit, **common)
            dz = [rel_l2(a, b) for a, b in zip(rec.z, ref.z)]
            dlogit = [rel_l2(a, b) for a, b in zip(rec.logits, ref.logits)]
            t = timed(var, vae, solver, sched, labels, seeds, reps=args.reps, **common)
            agree = [(a == b).float().mean().item() for a, b in zip(t['tokens'], ref.tokens)]
            row = dict(option=name, solver=solver.to_dict(), schedule=label, iters=st.iters, total_iters=sum(st.iters),
                       weighted_iters=sum(i * w for i, w in zip(st.iters, weights)), free_iters=t['iters'],
                       distance_z=dz, distance=max(dz), distance_logits=dlogit, token_agreement=agree,
                       images_per_s=t['images_per_s'], cpu_s=t['cpu_s'], residuals=st.residuals,
                       residual_curves=rec.residuals)
            out['rows'].append(row)
            print(f"{name:>10} {label:>12}  iters {st.iters}  dist {row['distance']:.2e}  "
                  f"agree {min(agree):.3f}  {row['images_per_s']:.1f} img/s", flush=True)

    adaptive_rows = lambda name: [r for r in out['rows'] if r['option'] == name and r['schedule'].startswith('tau=')]
    base = adaptive_rows('picard')
    out['equal_distance'] = {
        name: dict(total_iters=at_equal_distance(base, adaptive_rows(name), 'total_iters'),
                   weighted_iters=at_equal_distance(base, adaptive_rows(name), 'weighted_iters'),
                   images_per_s=at_equal_distance(base, adaptive_rows(name), 'images_per_s', sign=-1.0))
        for name, _ in options if name != 'picard' and base}
    return out


def markdown(result: Dict[str, Any]) -> str:
    """The per-option table and the equal-distance summary."""
    fmt = lambda v, f: 'n/a' if v is None else format(v, f)   # noqa: E731
    fewer = lambda r: 'n/a' if r['other'] is None else f"{100 * (1 - r['other'] / r['base']):.0f}%"   # noqa: E731
    runs = [[r['option'], r['schedule'], ','.join(map(str, r['iters'])), r['total_iters'], f"{r['distance']:.2e}",
             ' '.join(f'{d:.0e}' for d in r['distance_z']), f"{max(r['distance_logits']):.1e}",
             f"{min(r['token_agreement']):.3f}", f"{r['images_per_s']:.1f}"] for r in result['rows']]
    equal = [[name, a['schedule'], f"{a['distance']:.2e}", a['base'], fmt(a['other'], '.1f'), fewer(a), b['base'],
              fmt(b['other'], '.0f'), fewer(b), f"{c['base']:.1f}", fmt(c['other'], '.1f')]
             for name, eq in result['equal_distance'].items()
             for a, b, c in zip(eq['total_iters'], eq['weighted_iters'], eq['images_per_s'])]
    return (measure.table(['option', 'schedule', 'iters per scale', 'total', 'distance (max z rel L2)', 'per scale',
                           'logits rel L2 (max)', 'token agreement (min over scales)', 'img/s'], runs) + '\n\n'
            + measure.table(['option', 'at picard schedule', 'distance', 'picard total iters', 'option total iters',
                             'fewer iters', 'picard weighted', 'option weighted', 'fewer weighted', 'picard img/s',
                             'option img/s'], equal))


def plot(result: Dict[str, Any], path: str) -> None:
    """Distance against iterations and against images/s per option; residual per iteration at the last scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(dict.fromkeys(r['option'] for r in result['rows']))
    colors = {n: plt.get_cmap('tab10')(i) for i, n in enumerate(names)}
    for n in names:
        ada = [r for r in result['rows'] if r['option'] == n and r['schedule'].startswith('tau=')]
        con = [r for r in result['rows'] if r['option'] == n and not r['schedule'].startswith('tau=')]
        for rows, ls, mk in ((ada, '-', 'o'), (con, ':', 's')):
            if rows:
                axes[0].plot([r['total_iters'] for r in rows], [r['distance'] for r in rows], ls, marker=mk,
                             color=colors[n], label=n if rows is ada else None)
                axes[1].plot([r['images_per_s'] for r in rows], [r['distance'] for r in rows], ls, marker=mk,
                             color=colors[n])
        longest = max(ada + con, key=lambda r: r['total_iters'], default=None)
        if longest:
            axes[2].semilogy(range(1, len(longest['residual_curves'][-1]) + 1), longest['residual_curves'][-1],
                             color=colors[n], label=f"{n} ({longest['schedule']})")
    axes[0].set(xscale='log', yscale='log', xlabel='implicit iterations, summed over scales',
                ylabel=r'distance: max over scales of $\|z - z^*\| / \|z^*\|$',
                title='distance vs iterations (o: adaptive tau, s: fixed counts)')
    axes[1].set(yscale='log', xlabel='images/s (process CPU time)', ylabel='distance', title='distance vs speed')
    axes[2].set(xlabel='iteration t at the last scale', ylabel=r'$\|G(z)-z\| / \|G(z)\|$',
                title='residual per iteration, last scale (forced tokens)')
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format='png')
    plt.close(fig)


@dataclass
class FixedPointArgs:
    """The model, the solvers and schedules compared, and the images sampled."""
    var_ckpt: str = flag('', "a VIAR checkpoint (slim export), or 'random' (smoke test)")
    vae_ckpt: str = flag('', 'tokenizer (default: the one the export embeds or records)')
    options: str = flag(','.join(SOLVERS), f'comma list of solvers: {", ".join(SOLVERS)}')
    m: int = flag(5, 'Anderson history size')
    lam: float = flag(1e-6, 'Anderson regularisation, relative to the mean squared residual')
    beta: float = flag(1.0, 'Anderson mixing')
    taus: str = flag('0.1,0.05,0.02,0.01,0.005,0.002,0.001,0.0005,0.0002,0.0001', 'tau of each adaptive schedule')
    cap: int = flag(50, 'iteration cap of the adaptive schedules')
    counts: Tuple[int, ...] = flag((4, 8, 12, 16), 'fixed counts Con.(c,c) also run')
    ref_iters: int = flag(50, 'iterations per scale of the long-run reference')
    per_class: int = flag(5, 'images per class')
    first_seed: int = flag(0, 'image i is sampled with seed first_seed + i')
    cfg: float = flag(1.5, 'classifier-free guidance')
    top_k: int = flag(0, 'top-k sampling (0: off)')
    top_p: float = flag(0.0, 'top-p sampling (0: off)')
    reps: int = flag(3, 'timed calls per config (after one warm-up)')
    threads: int = flag(1, 'torch threads')
    seed: int = flag(0, 'random weights of the smoke test')
    out: str = flag('bench_out/fixed_point', 'output folder')


def main(argv=None) -> Dict[str, Any]:
    """The study, its files and its tables."""
    args = cli.parse_dataclass(FixedPointArgs, argv, __doc__.split('\n\n')[0], 'study')
    if not args.var_ckpt:
        raise SystemExit("--var_ckpt is required: a VIAR checkpoint, or 'random'")
    try:
        options = parse_options(args.options, args.m, args.lam, args.beta)
    except ValueError as e:
        raise SystemExit(f'--options/--m/--lam/--beta: {e}') from None
    check_writable(args.out)   # a folder that cannot be written fails now, not after the study
    torch.set_num_threads(args.threads)
    mach = measure.machine_facts()
    vae, var = load(args)
    model = dict(patch_nums=list(var.patch_nums), width=var.C, num_classes=var.num_classes,
                 describe=describe_model(var))
    result = dict(args=dataclasses.asdict(args), machine=mach, model=model, **study(vae, var, args, options))
    result['machine']['load_avg_end'] = list(os.getloadavg())
    table = markdown(result)
    measure.write_report(args.out, 'fixed_point', result, table + '\n', plot)
    print(table)
    print(f"# machine: {measure.machine_line()}; load average {mach['load_avg'][0]:.2f} at the start")
    return result


if __name__ == '__main__':
    main()
