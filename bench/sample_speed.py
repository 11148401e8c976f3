"""Sampling benchmark (not a test): images/s, peak memory and KV-cache bytes of VAR and VIAR per schedule.

Each config runs in a child process of its own (its peak memory is its own); `--official PATH` runs the official code
on the same weights in a second child, alternating call by call. Writes OUT/sample_speed.{json,md,png}; docs/SPEED.md.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

if __name__ == '__main__':   # `python bench/sample_speed.py`: the project root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import measure  # noqa: E402
from models.blocks import onednn_dense  # noqa: E402
from models.config import ModelSpec  # noqa: E402
from models.schedules import DEFAULT_CAP, IterSchedule, official_iters  # noqa: E402
from utils import cli  # noqa: E402
from utils.atomic import atomic_path, check_writable  # noqa: E402
from utils.checkpoint import CheckpointError, load_vae_weights, load_var_weights, read_checkpoint  # noqa: E402
from utils.cli import flag  # noqa: E402
from utils.model_io import load_or_build, peek_spec  # noqa: E402
from utils.sample.compile_util import (AUTOCAST_DTYPES, native_bf16, prepare_for_sampling,  # noqa: E402
                                       read_cpu_flags, resolve_dtype)
from utils.sample.config import add_model_source_args, add_sample_args, parse, resolve_device, was_typed  # noqa: E402
from utils.sample.schedule_flags import from_token  # noqa: E402

MiB = 2 ** 20
SPREAD_LIMIT = 0.10   # timed calls of one row that differ by more than 10% (slowest / fastest - 1): not a steady figure


def parse_schedules(text: str, num_scales: int, cap: int, tau_json: str = '', stop_mode: str = 'rel') -> List[Dict]:
    """The --schedules list as JSON-able schedules (schedule_flags.from_token)."""
    return [from_token(t, num_scales, cap, tau_json, stop_mode).to_dict() for t in text.split(',') if t.strip()]


def timing_basis(device: str, threads: int) -> str:
    """'cpu' (process CPU time, load-proof) for a single-threaded CPU run, else 'wall'."""
    return 'cpu' if device == 'cpu' and threads == 1 else 'wall'


def summarise(reps: List[Dict[str, float]], B: int, basis: str = 'wall') -> Dict[str, Any]:
    """Images/s of the best call (total, transformer = total - decode, decode) on both clocks, unprefixed on `basis`;
    the raw seconds kept."""
    out = dict(basis=basis, **{k: [r[k] for r in reps] for k in ('wall_s', 'decode_wall_s', 'cpu_s', 'decode_cpu_s')})
    for clock in ('wall', 'cpu'):
        total, dec = f'{clock}_s', f'decode_{clock}_s'
        for part, t in (('', min(r[total] for r in reps)), ('transformer_', min(r[total] - r[dec] for r in reps)),
                        ('decode_', min(r[dec] for r in reps))):
            out[f'{clock}_{part}images_per_s'] = B / t if t > 0 else None
    for part in ('', 'transformer_', 'decode_'):
        out[f'{part}images_per_s'] = out[f'{basis}_{part}images_per_s']
    return out


def reliability(load: float, cpu_threads: int, rep_seconds: List[float], spread_limit: float = SPREAD_LIMIT
                ) -> List[str]:
    """Why a row's timing is unreliable ([] if it is not): a load above the CPU threads (the clock counted waiting),
    or timed calls differing by more than spread_limit."""
    why = [f'load {load:.1f} > {cpu_threads} CPU threads'] if load > cpu_threads else []
    if len(rep_seconds) > 1 and min(rep_seconds) > 0:
        spread = max(rep_seconds) / min(rep_seconds) - 1
        if spread > spread_limit:
            why.append(f'repeats differ by {100 * spread:.0f}% > {100 * spread_limit:.0f}%')
    return why


def timing_cell(row: Dict[str, Any]) -> str:
    """The table's timing column: 'ok', 'UNRELIABLE: <why>', or '-' for a row measured without the check."""
    if 'unreliable' not in row:
        return '-'
    return 'UNRELIABLE: ' + '; '.join(row['unreliable']) if row['unreliable'] else 'ok'


def bound_fraction(side: Dict[str, Any], B: int, gemm_rates: Dict[str, float]) -> Dict[str, Optional[float]]:
    """A call's physical bound, FLOPs / peak GEMM rate in the side's dtype (s), and its share of the best call's
    time (1.0: every FLOP at the peak rate)."""
    rate, flops, ips = gemm_rates.get(side.get('dtype')), side.get('flops'), side.get('images_per_s')
    if not (rate and flops and ips):
        return dict(bound_s=None, of_bound=None)
    return dict(bound_s=flops / rate, of_bound=flops / rate / (B / ips))


def cpu_meta(flags, capability: str, env: Dict[str, str]) -> Dict[str, Any]:
    """What decides this CPU's speed in each dtype: its SIMD flags, torch's kernel level, the ISA caps."""
    return dict(flags=[f for f in measure.SIMD_FLAGS if f in flags], capability=capability,
                caps={k: env[k] for k in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA') if env.get(k)},
                native_bf16=native_bf16(flags, env.get('ONEDNN_MAX_CPU_ISA')))


def fmt(x: Optional[float], digits: int = 2) -> str:
    """A table cell: '-' for a missing figure."""
    return '-' if x is None else f'{x:.{digits}f}'


def percent(x: Optional[float]) -> str:
    """A fraction as a table cell ('n/a' when unknown)."""
    return f'{100 * x:.0f}%' if x else 'n/a'


def markdown_table(result: Dict[str, Any]) -> str:
    """One row per config, ours and the official side by side; then how it was measured."""
    meta, rows = result['meta'], result['rows']
    mem = 'CUDA max alloc' if meta['device'].startswith('cuda') else 'peak RSS'
    has_off = any(r.get('official') for r in rows)
    extra = sorted({k for r in rows for k in r if k.startswith('official_') and isinstance(r[k], dict)})
    sides = ['ours'] + ['official'] * has_off + extra
    has_bound = any(r['ours'].get('of_bound') is not None for r in rows)
    sweep = bool(meta.get('batch_sizes'))
    head = ['model', 'schedule'] + ['batch'] * sweep + [
        'iters/scale', 'img/s wall', 'img/s CPU', 'transformer img/s', 'VAE img/s', f'{mem} MiB', 'transformer +MiB',
        'KV MiB', 'timing']
    if has_off:
        head += ['official img/s', 'official transformer img/s', f'official {mem} MiB', 'official transformer +MiB',
                 'official KV MiB', 'ratio', 'transformer ratio', 'same images']
    for k in extra:   # further official dtypes (--official_dtypes)
        head += [f'official {k[9:]} img/s', f'ratio vs official {k[9:]}']
    if has_bound:
        first = (meta.get('official_dtypes') or ['?'])[0]
        head += ['GFLOP/call'] + [('ours' if k == 'ours' else f'official {k[9:] or first}') + ' of bound'
                                  for k in sides]

    def mem_cells(s):   # the memory call's peak, what its transformer phase adds to the loaded models, the KV cache
        p = s['probe']
        return [fmt(p['peak_bytes'] / MiB, 0), fmt(max(0, p['transformer_peak_bytes'] - p['base_bytes']) / MiB, 0),
                fmt(s['kv_cache_bytes'] / MiB, 1)]
    body = []
    for r in rows:
        o, f = r['ours'], r.get('official')
        clock = {c: o.get(f'{c}_images_per_s', o['images_per_s'] if meta['basis'] == c else None)
                 for c in ('wall', 'cpu')}
        cells = [r['model'], r['schedule']] + [r.get('B')] * sweep + [
            ','.join(map(str, r['iters_used'] or r['counts'] or [])) or '-', fmt(clock['wall']), fmt(clock['cpu']),
            fmt(o['transformer_images_per_s']), fmt(o['decode_images_per_s']), *mem_cells(o), timing_cell(r)]
        if has_off:
            cells += ([fmt(f['images_per_s']), fmt(f['transformer_images_per_s']), *mem_cells(f), fmt(r['ratio']),
                       fmt(r['transformer_ratio']), 'yes' if r['same_images'] else 'NO'] if f else ['n/a'] * 8)
        for k in extra:
            cells += [fmt(r[k]['images_per_s']), fmt(r[f'ratio_{k}'])] if r.get(k) else ['n/a'] * 2
        if has_bound:
            cells += [fmt((o.get('flops') or 0) / 1e9, 1)] + [percent(r.get(k, {}).get('of_bound')) for k in sides]
        body.append(cells)
    cpu = meta.get('cpu')
    onednn = meta.get('onednn_gemm_gflops') or {}
    rates = ', '.join(f'{d} {g:.0f}' + (f' (oneDNN Linear {onednn[d]:.0f})' if d in onednn else '')
                      for d, g in (meta.get('gemm_gflops') or {}).items())
    flags = cpu and (' '.join(cpu['flags']) or 'none of ' + '/'.join(measure.SIMD_FLAGS))
    caps = cpu and ''.join(f', {k}={v}' for k, v in cpu['caps'].items())
    official = has_off and meta.get('official_dtypes') and f", official {','.join(meta['official_dtypes'])}"
    note = [meta['machine'] + (f" (flags: {flags}; torch kernels {cpu['capability']}{caps})" if cpu else ''),
            rates and f'peak GEMM GFLOP/s (1360x768 @ 768x3072): {rates}',
            f"{meta['device']}, {meta['threads']} thread(s), ours {meta['dtype']}{' --fast' * bool(meta.get('fast'))}"
            f"{official or ''}, batch {','.join(map(str, meta.get('batch_sizes') or [meta['B']]))}, depth "
            f"{meta['depth']} (width {meta['width']}), VIAR pre/post {meta['pre_depth']}/{meta['post_depth']}, "
            f"patch_nums {','.join(map(str, meta['patch_nums']))} ({meta['image_px']} px), "
            + ('checkpoint ' + meta['var_ckpt'] if meta['var_ckpt'] else 'random weights'),
            f"best of {meta['reps']} calls after {meta['warmup']} warm-up"
            + ', alternating with the official code' * has_off,
            'img/s on both clocks (CPU: per second of process CPU time, all threads), the other rates by '
            + ('process CPU time' if meta['basis'] == 'cpu' else 'wall clock'),
            'timing UNRELIABLE where the load average passed the CPU threads or the timed calls differ by more than '
            f'{100 * SPREAD_LIMIT:.0f}%',
            'memory from one more call (' + ('peak minus allocated before it' if mem != 'peak RSS' else
                                             'peak RSS; +MiB over the RSS before it, freed memory released') + ')',
            f"load average {meta['load_avg']}"]
    return measure.table(head, body) + '\n\n' + '; '.join(p for p in note if p) + '.\n'


def sweep_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """--batch_sizes: per config and batch size, our images/s, FLOPs per call and share of the bound."""
    return [dict(model=r['model'], schedule=r['schedule'], B=r['B'], images_per_s=r['ours']['images_per_s'],
                 flops=r['ours'].get('flops'), bound_s=r['ours'].get('bound_s'), of_bound=r['ours'].get('of_bound'))
            for r in rows]


def sweep_table(sweep: List[Dict[str, Any]]) -> str:
    """The batch-size sweep, one row per config and batch size."""
    return measure.table(['model', 'schedule', 'batch', 'img/s', 'GFLOP/call', 'of bound'], [
        [s['model'], s['schedule'], s['B'], fmt(s['images_per_s'], 3), fmt((s['flops'] or 0) / 1e9, 1),
         percent(s['of_bound'])] for s in sweep])


def profile_table(result: Dict[str, Any]) -> str:
    """Per config, self time of the heaviest ops of one call, ours beside the official."""
    out = []
    for r in result['rows']:
        sides = [k for k in ('ours', 'official') if r.get(k) and 'profile' in r[k]]
        if sides:
            per = {k: {o['name']: o['self_cpu_s'] for o in r[k]['profile']['ops']} for k in sides}
            names = sorted(set().union(*per.values()), key=lambda n: -max(p.get(n, 0.0) for p in per.values()))
            body = [[n] + [f'{per[k][n]:.3f}' if n in per[k] else '-' for k in sides] for n in names]
            body.append(['total (all ops)'] + [f"{r[k]['profile']['total_self_cpu_s']:.3f}" for k in sides])
            out += [f"### {r['model']} {r['schedule']}", '', measure.table(['op'] + [f'{k} self s' for k in sides],
                                                                            body), '']
    return '\n'.join(out)


def plot(result: Dict[str, Any], path: str) -> None:
    """images/s against peak memory, one point per schedule (VIAR), VAR as a star; official points hollow."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    meta = result['meta']
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for side, filled in (('ours', True), ('official', False)):
        for r in (r for r in result['rows'] if r.get(side)):
            x, y, is_var = r[side]['probe']['peak_bytes'] / MiB, r[side]['images_per_s'], r['model'] == 'VAR'
            color = 'C3' if is_var else 'C0'
            ax.scatter([x], [y], marker='*' if is_var else 'o', s=140 if is_var else 50,
                       facecolors=color if filled else 'none', edgecolors=color)
            if filled:
                ax.annotate('VAR' if is_var else r['schedule'], (x, y), textcoords='offset points', xytext=(5, 4),
                            fontsize=8)
    ax.set_xlabel(('CUDA max allocated' if meta['device'].startswith('cuda') else 'peak RSS') + ' (MiB)')
    ax.set_ylabel('images / s')
    title = f"VIAR schedules vs VAR: d{meta['depth']}, batch {meta['B']}, {meta['dtype']}, {meta['device']}"
    hollow = any(r.get('official') for r in result['rows'])
    ax.set_title(title + ('\n(hollow: official implementation)' if hollow else ''), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


def build_sampler(msg):
    """A sampling child's (device, vae, call) with this project's models."""
    device, spec = torch.device(msg['device']), ModelSpec.from_dict(msg['model'])
    vae, var = spec.build(device)
    sd = read_checkpoint(msg['state_path'])
    load_vae_weights(vae, sd.pop('vae'))
    load_var_weights(var, sd.pop('var'))
    sampler = prepare_for_sampling(var.eval(), compile=msg['compile'], dtype=msg['dtype'], fast=msg['fast'],
                                   scope=msg['compile_scope'])
    label_B = torch.arange(msg['B'], device=device) % spec.num_classes
    kw = dict(g_seed=msg['g_seed'], cfg=msg['cfg'], top_k=msg['top_k'], top_p=msg['top_p'],
              schedule=IterSchedule.from_dict(msg['schedule']), fill_forward=msg['fill_forward'], return_stats=True)
    return device, vae, lambda: sampler(msg['B'], label_B, **kw)


@dataclass
class SpeedArgs:
    """Which models and schedules run, and how (random weights unless --var_ckpt)."""
    models: str = flag('VAR,VIAR', 'which of VAR, VIAR to run (a checkpoint fixes it)')
    seed: int = flag(0, 'seed of the random weights')
    schedules: str = flag('20:20,10:10,20:5,10:5,5:5,tau=0.01',
                          "comma list: 'A:B' = the iter_left/iter_right knob (this project's K-point rule); 'A:B/10' = "
                          "the official 10-point rule; 'tau=X' or 'tau=json' = adaptive (--tau_cap, --tau_json)")
    bs: int = flag(4, 'images per call (the CFG batch is twice this)')
    batch_sizes: Tuple[int, ...] = flag((), 'sweep: run every config at each of these batch sizes instead of --bs')
    g_seed: int = flag(0, 'sampling seed (same images every call)')
    threads: int = flag(0, 'torch threads per child (0: torch default)')
    warmup: int = flag(1, 'untimed calls per child first')
    reps: int = flag(3, 'timed calls per child')
    official: str = flag('', 'also run the official implementation from this checkout, side by side', metavar='PATH')
    official_dtypes: str = flag('', "autocast dtypes of the official side, e.g. fp32,bf16: one official child each, "
                                    "all alternating with ours (default: the dtype ours runs in)", metavar='LIST')
    profile: bool = flag(False, 'also profile one call per side (torch.profiler) into sample_speed_profile.md')
    out: str = flag('bench_out', 'output folder')


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags, the model flags and the sampling flags it uses."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_args(p, SpeedArgs, 'benchmark')
    add_model_source_args(p, skip=('ema',))
    p.set_defaults(var_ckpt='random')   # random weights unless a checkpoint is given
    add_sample_args(p, only=('cfg', 'top_k', 'top_p', 'tau_json', 'tau_cap', 'stop_mode', 'official_kv', 'dtype',
                             'compile', 'compile_scope', 'fast'), defaults=dict(dtype='fp32'))
    return p


def plan_schedules(source, sample, text: str):
    """(K, schedules) on the scales of the model that will run, read before anything is built, so a bad token or a
    tau JSON for another pyramid fails at once."""
    try:
        K = len(peek_spec(source).patch_nums)
        return K, parse_schedules(text, K, sample.tau_cap or DEFAULT_CAP, sample.tau_json, sample.stop_mode)
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f'--schedules: {e}') from None


def write_state(source, kind: str, tmpdir: str, seed: int):
    """(spec, path): one model pair built or loaded, its state dicts saved for the children."""
    loaded = load_or_build(dataclasses.replace(source, arch=dict(source.arch, use_implicit=kind == 'VIAR')), 'cpu',
                           seed=seed)
    path = os.path.join(tmpdir, f'{kind}.pt')
    torch.save({'vae': loaded.vae.state_dict(), 'var': loaded.var.state_dict()}, path)
    return loaded.spec, path


def run_config(args, spec, state_path: str, schedule: Dict[str, Any], device: str, B: int) -> Dict[str, Any]:
    """One config at batch B: start the children, warm up, alternate timed calls, measure memory; its row."""
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(args.threads)} if args.threads else {}))
    msg = dict(model=spec.to_dict(), state_path=state_path, schedule=schedule, B=B, dtype=args.dtype,
               device=device, threads=args.threads, g_seed=args.g_seed, cfg=args.cfg, top_k=args.top_k,
               top_p=args.top_p, fill_forward=not args.official_kv, compile=args.compile, fast=args.fast,
               compile_scope=args.compile_scope)
    is_viar = spec.kind == 'VIAR'
    msgs = {'ours': msg}
    if args.official and schedule['tau'] is None:
        official_schedule = schedule if is_viar else dict(   # a VAR ignores the knob the official sampler takes
            schedule, knob=[10, 10], counts=official_iters(10, 10, len(spec.patch_nums)))
        for dt in args.official_dtypes:   # the first is 'official', the others 'official_<dtype>'
            msgs['official' if dt == args.official_dtypes[0] else f'official_{dt}'] = dict(
                msg, dtype=dt, schedule=official_schedule)
    load_before, kids = os.getloadavg()[0], {}
    try:
        for k in msgs:
            kids[k] = measure.official_child(args.official, k, env) if k != 'ours' else measure.Child(
                [sys.executable, os.path.abspath(__file__), '--serve'], 'project', env=env, cwd=measure.ROOT)
        built = {k: c.ask(cmd='setup', **msgs[k]) for k, c in kids.items()}
        reps = {k: [] for k in kids}
        for i in range(args.warmup + args.reps):
            for k, c in kids.items():   # alternate, so load changes hit both sides alike
                out = c.ask(cmd='run')
                if i >= args.warmup:
                    reps[k].append(out)
        mem = {k: c.ask(cmd='memory') for k, c in kids.items()}
        prof = {k: c.ask(cmd='profile') for k, c in kids.items()} if args.profile else {}
    finally:
        for c in kids.values():
            c.close()
    basis = timing_basis(device, args.threads)
    row = dict(model=spec.kind, schedule=schedule['name'] if is_viar else '-', B=B,
               counts=schedule['counts'] if is_viar else None)
    for k in kids:
        last = reps[k][-1]
        row[k] = dict(summarise(reps[k], B, basis), kv_cache_bytes=last['kv_cache_bytes'], digest=last['digest'],
                      dtype=msgs[k]['dtype'], rss_after_build_bytes=built[k]['rss_after_build_bytes'], **mem[k])
        row[k].update(bound_fraction(row[k], B, args.gemm_rates), **({'profile': prof[k]} if k in prof else {}))
    row['iters_used'] = reps['ours'][-1]['iters']
    row['load_avg'] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    row['unreliable'] = reliability(max(row['load_avg']), os.cpu_count() or 1, row['ours'][f'{basis}_s'])

    def ratio(k, rate):
        a, b = row['ours'][rate], row[k][rate]
        return a / b if a and b else None
    if 'official' in row:
        for rate in (f'{clock}{part}' for clock in ('', 'wall_', 'cpu_') for part in ('', 'transformer_')):
            row[f'{rate}ratio'] = ratio('official', f'{rate}images_per_s')
        row['same_images'] = row['ours']['digest'] == row['official']['digest']
    for k in (k for k in kids if k.startswith('official_')):
        row[f'ratio_{k}'] = ratio(k, 'images_per_s')
    return row


def check_args(args, sample, device_type: str) -> List[str]:
    """The models to run; refuses bad flags in one line each and resolves args.dtype (--fast without --dtype: the
    machine's fast dtype) and args.official_dtypes (default: ours)."""
    if sample.compile and args.warmup < 1:
        raise SystemExit('--compile needs --warmup >= 1: the first call compiles')
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f'--batch_sizes must be positive, got {",".join(map(str, args.batch_sizes))}')
    if args.official:
        measure.check_official(args.official)
    kinds = [k.strip().upper() for k in args.models.split(',') if k.strip()]
    if not kinds or any(k not in ('VAR', 'VIAR') for k in kinds):
        raise SystemExit(f'--models must list VAR and/or VIAR, got {args.models!r}')
    args.dtype = resolve_dtype(device_type, args.dtype if was_typed(sample, 'dtype') or not args.fast else 'auto',
                               args.fast)
    args.official_dtypes = [d.strip() for d in args.official_dtypes.split(',') if d.strip()] or [args.dtype]
    bad = [d for d in args.official_dtypes if d not in AUTOCAST_DTYPES]
    if bad:
        raise SystemExit(f'--official_dtypes: {bad} not among {sorted(AUTOCAST_DTYPES)}')
    return kinds


def main(argv=None):
    args, source, sample = parse(build_parser(), argv, schedule_list=True)
    device = resolve_device(source.device)
    kinds = check_args(args, sample, device.type)
    K, scheds = plan_schedules(source, sample, args.schedules)
    if args.official and K != 10 and any(s['knob'] and not s['name'].endswith('/10') and s['knob'][0] != s['knob'][1]
                                         for s in scheds):
        raise SystemExit("--official on a model with K != 10 scales: 'A:B' runs this project's K-point rule, which "
                         "the official sampler cannot; write 'A:B/10' for the official 10-point rule")
    check_writable(args.out)   # a folder that cannot be written fails now, not after the runs
    load_start = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    args.gemm_rates, onednn_rates = {}, {}
    if device.type == 'cpu':   # the physical bound: this CPU's peak GEMM rate in every dtype that runs
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads or threads)
        dtypes = {d: AUTOCAST_DTYPES[d] or torch.float32 for d in [args.dtype] + args.official_dtypes}
        basis = timing_basis('cpu', args.threads)
        args.gemm_rates = {d: measure.gemm_rate(dt, basis) for d, dt in dtypes.items()}
        onednn_rates = {d: measure.gemm_rate(dt, basis, onednn=True) for d, dt in dtypes.items() if onednn_dense(dt)}
        torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix='sample_speed_') as tmp:
        for kind in kinds:
            try:
                spec, state_path = write_state(source, kind, tmp, args.seed)
            except CheckpointError as e:
                raise SystemExit(f'error: {e}') from None
            if spec.kind != kind:
                print(f'skipping {kind}: the checkpoint is a {spec.kind}', file=sys.stderr)
                continue
            configs = scheds if kind == 'VIAR' else [dict(name='-', counts=[0] * K, tau=None, stop_mode='rel',
                                                          min_iters=1, knob=None)]
            for sched in configs:
                for B in args.batch_sizes or (args.bs,):
                    print(f'[sample_speed] {kind} {sched["name"]} batch {B} ...', file=sys.stderr, flush=True)
                    rows.append(r := run_config(args, spec, state_path, sched, str(device), B))
                    print(f'[sample_speed]   ours {r["ours"]["wall_images_per_s"]:.3f} img/s wall, '
                          f'{r["ours"]["cpu_images_per_s"]:.3f} img/s CPU; {timing_cell(r)}', file=sys.stderr,
                          flush=True)
    meta = dict(machine=torch.cuda.get_device_name(device) if device.type == 'cuda' else measure.machine_name(),
                device=str(device), threads=args.threads or torch.get_num_threads(), dtype=args.dtype, fast=args.fast,
                official_dtypes=args.official_dtypes if args.official else [], B=args.bs,
                batch_sizes=list(args.batch_sizes), gemm_gflops={d: r / 1e9 for d, r in args.gemm_rates.items()},
                onednn_gemm_gflops={d: r / 1e9 for d, r in onednn_rates.items()},
                cpu=cpu_meta(read_cpu_flags(), torch.backends.cpu.get_cpu_capability(), dict(os.environ))
                if device.type == 'cpu' else None, depth=spec.depth, width=spec.width, pre_depth=spec.pre_depth,
                post_depth=spec.post_depth, patch_nums=list(spec.patch_nums), image_px=spec.image_px,
                var_ckpt='' if source.var_ckpt == 'random' else source.var_ckpt, warmup=args.warmup, reps=args.reps,
                compile=args.compile, compile_scope=args.compile_scope if args.compile else None,
                official=args.official or None, basis=timing_basis(str(device), args.threads),
                cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, fill_forward=not args.official_kv,
                load_avg=f"{load_start} -> {' '.join(f'{x:.1f}' for x in os.getloadavg())}", torch=torch.__version__)
    result = dict(meta=meta, rows=rows, **({'sweep': sweep_rows(rows)} if args.batch_sizes else {}))
    table = markdown_table(result) + ('\n' + sweep_table(result['sweep']) + '\n' if args.batch_sizes else '')
    measure.write_report(args.out, 'sample_speed', result, table, plot)
    if args.profile:
        with atomic_path(os.path.join(args.out, 'sample_speed_profile.md')) as tmp, open(tmp, 'w') as f:
            f.write(profile_table(result))
    print(table)
    return result


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        measure.serve(measure.sampling_handlers(build_sampler, lambda out: (out[0], out[1].kv_cache_bytes,
                                                                            out[1].iters or None)))
    else:
        main()
