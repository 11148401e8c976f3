"""Convergence of VIAR's implicit block during sampling (the paper's Fig. 3), and per-scale adaptive tau.

Samples with T iterations at every scale, records per scale and iteration cos(z_t, z_{t-1}) and
||z_t - z_{t-1}|| / ||z_{t-1}||, and suggests per scale the tau at which the adaptive sampler (stop_mode 'rel')
stops once the mean cosine reaches --target_cos. Method and outputs: docs/SPEED.md, "Convergence of the implicit
block".

    python scripts/convergence.py --var_ckpt ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --T 20
    python sampling.py ... --tau_json convergence_out/convergence.json --tau_cap 20
"""
import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__' and ROOT not in sys.path:   # run as a script: make the project importable
    sys.path.insert(0, ROOT)

from models.schedules import constant  # noqa: E402
from models.solver import residual_norm  # noqa: E402
from utils.atomic import write_json_atomic  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.model_io import load_or_build  # noqa: E402
from utils.sample.compile_util import SamplingError, prepare_for_sampling  # noqa: E402
from utils.sample.config import (add_model_source_args, add_sample_args, parse, resolve_device,  # noqa: E402
                                 with_recorded)


# ---------------------------------------------------------------- arithmetic (pure)

def step_metrics(z_next_BLC: torch.Tensor, z_BLC: torch.Tensor, B: int) -> Dict[str, float]:
    """Mean over the first B rows of cos(z_next, z) and ||z_next - z|| / ||z|| (each row flattened), plus the
    sampler's residual over all rows (what an adaptive schedule compares with tau)."""
    a_BN, b_BN = z_next_BLC[:B].float().reshape(B, -1), z_BLC[:B].float().reshape(B, -1)
    cos_B = torch.nn.functional.cosine_similarity(a_BN, b_BN, dim=1, eps=1e-12)
    rel_B = (a_BN - b_BN).norm(dim=1) / b_BN.norm(dim=1).clamp_min(1e-12)
    return dict(cosine=cos_B.mean().item(), rel_residual=rel_B.mean().item(),
                solver_residual=residual_norm(z_next_BLC, z_BLC, 'rel').item())


def suggest_tau(cosine_t: Sequence[float], solver_residual_t: Sequence[float], target_cos: float):
    """(tau, n): n = the first iteration (1-based; entry n - 1 of the curves) whose cosine reaches the target, and
    the geometric mean of the residuals after iterations n - 1 and n (after n alone when n = 1 or the residual did
    not fall). When the target is never reached: the last residual and n = None."""
    for i, c in enumerate(cosine_t):
        if c >= target_cos:
            res_n = float(solver_residual_t[i])
            before = float(solver_residual_t[i - 1]) if i > 0 else res_n
            return (math.sqrt(before * res_n) if before > res_n else res_n), i + 1
    return float(solver_residual_t[-1]), None


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def measure_convergence(var, label_B: torch.Tensor, T: int, g_seed: Optional[int] = 0, cfg: float = 1.5,
                        top_k: int = 900, top_p: float = 0.96, target_cos: float = 0.99, sampler=None) -> Dict:
    """Sample with T iterations at every scale and return the convergence curves and suggested tau. The iterates
    come from the model's iterate hook, so the model code carries no analysis code.

    sampler: a compile_util Sampler of `var` (its dtype); default `var.autoregressive_infer_cfg` in fp32.
    """
    B = label_B.shape[0]
    scale_of_len = {pn * pn: si for si, pn in enumerate(var.patch_nums)}
    rows: List[List[Dict[str, float]]] = [[] for _ in var.patch_nums]
    handle = var.register_iterate_hook(
        lambda z, z_next: rows[scale_of_len[z_next.shape[1]]].append(step_metrics(z_next, z, B)))
    try:
        (sampler or var.autoregressive_infer_cfg)(B, label_B, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                                  schedule=constant(T, len(var.patch_nums)))
    finally:
        handle.remove()
    cosine, rel, solver = ([[r[key] for r in scale] for scale in rows]
                           for key in ('cosine', 'rel_residual', 'solver_residual'))
    picks = [suggest_tau(c, s, target_cos) for c, s in zip(cosine, solver)]
    return dict(patch_nums=list(var.patch_nums), T=T, B=B, target_cos=target_cos, cosine=cosine, rel_residual=rel,
                solver_residual=solver, suggested_tau=[p[0] for p in picks], iters_to_target=[p[1] for p in picks],
                stop_mode='rel')


def plot(result: Dict, path: str) -> None:
    """Cosine and relative residual against the iteration, one curve per scale."""
    import matplotlib   # here, not at the top: only the plot needs it, and it is slow to import
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    cmap = plt.get_cmap('viridis')
    K = len(result['patch_nums'])
    for si, pn in enumerate(result['patch_nums']):
        t = list(range(1, len(result['cosine'][si]) + 1))
        color = cmap(si / max(K - 1, 1))
        ax1.plot(t, result['cosine'][si], color=color, label=f'{pn}x{pn}')
        ax2.semilogy(t, result['rel_residual'][si], color=color, label=f'{pn}x{pn}')
    ax1.axhline(result['target_cos'], color='gray', ls='--', lw=0.8)
    xlabel = r'iteration $t$ (compares $z_t$ with $z_{t-1}$)'
    ax1.set(xlabel=xlabel, ylabel=r'$\cos(z_t, z_{t-1})$', title='cosine similarity of successive iterates')
    ax2.set(xlabel=xlabel, ylabel=r'$\|z_t - z_{t-1}\| \,/\, \|z_{t-1}\|$', title='relative residual')
    ax2.legend(title='scale', fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_model_source_args(p, defaults=dict(use_implicit=True))
    # iterates are recorded by hooks, so no --compile; fp32 unless told otherwise (residuals near bf16 precision)
    add_sample_args(p, only=('cfg', 'top_k', 'top_p', 'dtype', 'fast'), defaults=dict(dtype='fp32'))
    g = p.add_argument_group('analysis')
    g.add_argument('--T', type=int, default=20, help='iterations run at every scale')
    g.add_argument('--bs', type=int, default=8, help='class-conditional samples averaged over')
    g.add_argument('--class_labels', type=int, nargs='*', default=None, help='labels (default: seeded random)')
    g.add_argument('--seed', type=int, default=0, help='seeds the labels, the sampling and random weights')
    g.add_argument('--target_cos', type=float, default=0.99, help='cosine at which a scale counts as converged')
    g.add_argument('--out_dir', type=str, default='convergence_out')
    return p


def main(argv=None) -> Dict:
    args, source, sample = parse(build_parser(), argv)
    if args.T < 1 or args.bs < 1:
        raise SystemExit('--T and --bs must be >= 1')
    if source.var_ckpt is None:
        raise SystemExit('give --var_ckpt PATH (a VIAR checkpoint) or --var_ckpt random')
    device = resolve_device(source.device)
    try:
        loaded = load_or_build(source, device, seed=args.seed)
        sample, line = with_recorded(sample, loaded.sample_defaults, names=('cfg', 'top_k', 'top_p'))
        if line:
            print(line)
        var = loaded.var
        sampler = prepare_for_sampling(var, dtype=sample.dtype, fast=sample.fast)
    except (CheckpointError, SamplingError) as e:
        raise SystemExit(f'error: {e}') from None
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < var.num_classes]
        if bad:
            raise SystemExit(f'--class_labels {bad} outside [0, {var.num_classes})')
        label_B = torch.tensor(args.class_labels, device=device)
    else:
        g = torch.Generator().manual_seed(args.seed)
        label_B = torch.randint(0, var.num_classes, (args.bs,), generator=g).to(device)
    try:
        result = measure_convergence(var, label_B, args.T, g_seed=args.seed, cfg=sample.cfg, top_k=sample.top_k,
                                     top_p=sample.top_p, target_cos=args.target_cos, sampler=sampler)
    except ValueError as e:   # a VAR: no implicit block to watch
        raise SystemExit(f'error: {source.var_ckpt}: {e}') from None
    result.update(var_ckpt=source.var_ckpt, labels=label_B.tolist(), dtype=sampler.dtype, fast=sampler.fast)
    write_json_atomic(result, os.path.join(args.out_dir, 'convergence.json'), indent=1)   # creates out_dir
    plot(result, os.path.join(args.out_dir, 'convergence.png'))
    print(f'suggested adaptive tau per scale (stop_mode rel, target cosine {args.target_cos}; iterations = calls of '
          f'the implicit block, as the samplers\' "implicit iterations per scale" counts them):')
    per_scale = zip(result['patch_nums'], result['suggested_tau'], result['iters_to_target'], result['cosine'])
    for pn, tau, n, cos in per_scale:
        reach = (f'cosine reached after {n} iteration{"s" if n > 1 else ""}; tau stops adaptive sampling there'
                 if n else f'not reached in {args.T} iterations (final cosine {cos[-1]:.4f}): adaptive runs to its cap')
        print(f'  {pn:>3}x{pn:<3} tau={tau:.3g}  ({reach})')
    print(f"use: --tau_json {os.path.join(args.out_dir, 'convergence.json')}")
    return result


if __name__ == '__main__':
    main()
