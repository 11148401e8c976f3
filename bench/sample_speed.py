"""Sampling benchmark (not a test): images/s, peak memory and KV-cache bytes of VAR and VIAR per schedule.

Each config (VAR, or VIAR with one iteration schedule) runs in its own child process, so its peak
memory is its own (peak RSS on CPU, CUDA max allocated on a GPU). With `--official PATH` the same
config also runs through the official implementation in a second child, on the same weights;
the two children alternate call by call (after warm-up), so machine load hits both alike.

    python bench/sample_speed.py --depth 12 --p_depth 2 --bs 4 --patch_nums 1,2,3,4,5,6,8 \
        --threads 1 --official /path/to/official/VIAR

Writes OUT/sample_speed.json, OUT/sample_speed.md (a Markdown table) and OUT/sample_speed.png.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__' and ROOT not in sys.path:   # run as a script: make the project importable
    sys.path.insert(0, ROOT)

DEFAULT_SCHEDULES = '20:20,10:10,20:5,10:5,5:5,tau=0.01'
MiB = 2 ** 20


# ---------------------------------------------------------------- pure helpers

def parse_schedule(token: str, num_scales: int, cap: int = 20, tau_json: str = '', stop_mode: str = 'rel') -> Dict[str, Any]:
    """One schedule token -> a JSON-able dict: 'A:B' (official linspace knob), 'tau=X' or 'tau=json' (adaptive)."""
    token = token.strip()
    if token.startswith('tau='):
        value = token[4:]
        if value == 'json':
            from models.schedules import load_tau_json
            if not tau_json:
                raise ValueError("schedule 'tau=json' needs --tau_json PATH (written by scripts/convergence.py)")
            taus = load_tau_json(tau_json, num_scales)
            label = f'Ada.(json,cap={cap})'
        else:
            try:
                taus = [float(value)] * num_scales
            except ValueError:
                raise ValueError(f"bad schedule {token!r}: tau must be a number, e.g. tau=0.01") from None
            label = f'Ada.(tau={taus[0]:g},cap={cap})'
        return dict(label=label, counts=[cap] * num_scales, tau=taus, stop_mode=stop_mode, left=None, right=None)
    try:
        a, b = (int(t) for t in token.split(':'))
    except ValueError:
        raise ValueError(f"bad schedule {token!r}: use 'A:B' (e.g. 20:5) or 'tau=0.01' or 'tau=json'") from None
    kind = 'Con.' if a == b else 'Dec.' if a > b else 'Inc.'
    if num_scales <= 10:
        from bench.measure import official_counts
        counts = official_counts(a, b, num_scales)
    else:   # beyond the official knob's reach: the project's linspace over all scales
        from models.schedules import linspace_iters
        counts = linspace_iters(a, b, num_scales)
    return dict(label=f'{kind}({a},{b})', counts=counts, tau=None, stop_mode=stop_mode, left=a, right=b)


def timing_basis(device: str, threads: int) -> str:
    """'cpu' (process CPU time) for a single-threaded CPU run, robust to other processes sharing the
    machine; 'wall' (wall-clock) otherwise, e.g. on a GPU."""
    return 'cpu' if device == 'cpu' and threads == 1 else 'wall'


def summarise(reps: List[Dict[str, float]], B: int, basis: str = 'wall') -> Dict[str, Any]:
    """Images/s of the best timed call (total, transformer = total - VAE decode, decode) on both clocks;
    the unprefixed figures use `basis`. Raw per-call seconds are kept."""
    out = dict(basis=basis, wall_s=[r['wall_s'] for r in reps], decode_wall_s=[r['decode_wall_s'] for r in reps],
               cpu_s=[r['cpu_s'] for r in reps], decode_cpu_s=[r['decode_cpu_s'] for r in reps])
    for clock, total, dec in (('wall', 'wall_s', 'decode_wall_s'), ('cpu', 'cpu_s', 'decode_cpu_s')):
        t_total = min(r[total] for r in reps)
        t_tr = min(r[total] - r[dec] for r in reps)
        t_dec = min(r[dec] for r in reps)
        out[f'{clock}_images_per_s'] = B / t_total
        out[f'{clock}_transformer_images_per_s'] = B / t_tr if t_tr > 0 else None
        out[f'{clock}_decode_images_per_s'] = B / t_dec if t_dec > 0 else None
    for key in ('images_per_s', 'transformer_images_per_s', 'decode_images_per_s'):
        out[key] = out[f'{basis}_{key}']
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def memory_of(side: Dict[str, Any]) -> int:
    """The peak memory plotted and tabled: of the memory-probe call, CUDA max allocated on a GPU, else peak RSS."""
    return side['probe']['peak_bytes']


def transformer_delta(side: Dict[str, Any]) -> int:
    """Memory the transformer phase of a call adds to the loaded models (KV caches, activations, logits):
    its peak minus the memory before the call (RSS with freed memory released on CPU; allocated on a GPU)."""
    p = side['probe']
    return max(0, p['transformer_peak_bytes'] - p['base_bytes'])


def markdown_table(result: Dict[str, Any]) -> str:
    """The README table: one row per config, ours (and official, ratio) side by side."""
    meta, rows = result['meta'], result['rows']
    has_off = any(r.get('official') for r in rows)
    mem_name = 'CUDA max alloc' if meta['device'].startswith('cuda') else 'peak RSS'
    head = ['model', 'schedule', 'iters/scale', 'img/s', 'transformer img/s', 'VAE img/s',
            f'{mem_name} MiB', 'transformer +MiB', 'KV MiB']
    if has_off:
        head += ['official img/s', 'official transformer img/s', f'official {mem_name} MiB', 'official transformer +MiB',
                 'official KV MiB', 'ratio', 'transformer ratio', 'same images']
    fmt = lambda x, p=2: '-' if x is None else f'{x:.{p}f}'   # noqa: E731
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        o = r['ours']
        cells = [r['model'], r['schedule'], ','.join(map(str, r['iters_used'] or r['counts'] or [])) or '-',
                 fmt(o['images_per_s']), fmt(o['transformer_images_per_s']), fmt(o['decode_images_per_s']),
                 fmt(memory_of(o) / MiB, 0), fmt(transformer_delta(o) / MiB, 0), fmt(o['kv_cache_bytes'] / MiB, 1)]
        if has_off:
            f = r.get('official')
            if f:
                cells += [fmt(f['images_per_s']), fmt(f['transformer_images_per_s']), fmt(memory_of(f) / MiB, 0),
                          fmt(transformer_delta(f) / MiB, 0), fmt(f['kv_cache_bytes'] / MiB, 1), fmt(r['ratio']),
                          fmt(r['transformer_ratio']), 'yes' if r['same_images'] else 'NO']
            else:
                cells += ['n/a'] * 8
        lines.append('| ' + ' | '.join(cells) + ' |')
    note = (f"\n{meta['machine']}; {meta['device']}, {meta['threads']} thread(s), {meta['dtype']}, batch {meta['B']}, "
            f"depth {meta['depth']} (width {meta['width']}), VIAR pre/post {meta['pre_depth']}/{meta['post_depth']}, "
            f"patch_nums {','.join(map(str, meta['patch_nums']))} ({meta['image_px']} px), "
            f"{'checkpoint ' + meta['var_ckpt'] if meta['var_ckpt'] else 'random weights'}; "
            f"best of {meta['reps']} calls after {meta['warmup']} warm-up"
            f"{', alternating with the official code' if has_off else ''}, timed by "
            f"{'process CPU time' if meta['basis'] == 'cpu' else 'wall clock'}; memory from one more call "
            f"({'peak minus allocated before it' if meta['device'].startswith('cuda') else 'peak RSS; +MiB over the RSS before it, freed memory released'}); "
            f"load average {meta['load_avg']}.\n")
    return '\n'.join(lines) + '\n' + note


def profile_table(result: Dict[str, Any]) -> str:
    """Markdown: per config, self time of the heaviest ops in one call, ours beside the official."""
    out = []
    for r in result['rows']:
        sides = [k for k in ('ours', 'official') if r.get(k) and 'profile' in r[k]]
        if not sides:
            continue
        per = {k: {o['name']: o['self_cpu_s'] for o in r[k]['profile']['ops']} for k in sides}
        names = sorted(set().union(*per.values()), key=lambda n: -max(p.get(n, 0.0) for p in per.values()))
        out += [f"### {r['model']} {r['schedule']}", '', '| op | ' + ' | '.join(f'{k} self s' for k in sides) + ' |',
                '|---|' + '---|' * len(sides)]
        for n in names:
            out.append(f'| {n} | ' + ' | '.join(f'{per[k][n]:.3f}' if n in per[k] else '-' for k in sides) + ' |')
        out.append('| total (all ops) | ' + ' | '.join(f"{r[k]['profile']['total_self_cpu_s']:.3f}" for k in sides) + ' |')
        out.append('')
    return '\n'.join(out)


def plot(result: Dict[str, Any], path: str) -> None:
    """images/s against peak memory, one point per schedule (VIAR), VAR as a star; official points hollow."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    meta = result['meta']
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for side, filled in (('ours', True), ('official', False)):
        pts = [(r, r[side]) for r in result['rows'] if r.get(side)]
        for r, s in pts:
            x, y = memory_of(s) / MiB, s['images_per_s']
            is_var = r['model'] == 'VAR'
            ax.scatter([x], [y], marker='*' if is_var else 'o', s=140 if is_var else 50,
                       facecolors=('C3' if is_var else 'C0') if filled else 'none', edgecolors='C3' if is_var else 'C0')
            if filled:
                ax.annotate('VAR' if is_var else r['schedule'], (x, y), textcoords='offset points', xytext=(5, 4), fontsize=8)
    ax.set_xlabel(('CUDA max allocated' if meta['device'].startswith('cuda') else 'peak RSS') + ' (MiB)')
    ax.set_ylabel('images / s')
    title = f"VIAR schedules vs VAR: d{meta['depth']}, batch {meta['B']}, {meta['dtype']}, {meta['device']}"
    ax.set_title(title + ('\n(hollow: official implementation)' if any(r.get('official') for r in result['rows']) else ''),
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the project's child process

def _our_handlers():
    """measure.serve handlers that sample with this project's models."""
    import torch
    from bench import measure
    st = {}

    def setup(msg):
        if msg['threads']:
            torch.set_num_threads(int(msg['threads']))
        device = torch.device(msg['device'])
        from models.schedules import IterSchedule
        from utils.checkpoint import load_vae_weights, load_var_weights
        from utils.sample.compile_util import prepare_for_sampling
        from utils.model_io import ModelSpec, build_models
        spec = ModelSpec.from_dict(msg['model'])
        vae, var = build_models(spec, device)
        sd = torch.load(msg['state_path'], map_location=device, weights_only=False)
        load_vae_weights(vae, sd['vae'])
        load_var_weights(var, sd['var'])
        del sd
        sch = msg['schedule']
        schedule = IterSchedule(list(sch['counts']), tau=sch['tau'], stop_mode=sch['stop_mode'], name=sch['label'])
        sampler = prepare_for_sampling(var.eval(), compile=msg['compile'], dtype=msg['dtype'])
        label_B = torch.arange(msg['B'], device=device) % spec.num_classes
        kw = dict(g_seed=msg['g_seed'], cfg=msg['cfg'], top_k=msg['top_k'], top_p=msg['top_p'], schedule=schedule,
                  fill_forward=msg['fill_forward'], return_stats=True)
        st.update(device=device, call=lambda: sampler(msg['B'], label_B, **kw), decode=measure.DecodeTimer(vae, device),
                  overall={})
        rss = measure.current_rss_bytes()
        measure.reset_peak_memory(device)
        return {'ok': True, 'rss_after_build_bytes': rss}

    def describe(out):
        img, stats = out
        return img, stats.kv_cache_bytes, stats.iters or None

    return measure.sampling_handlers(setup, st, describe)


# ---------------------------------------------------------------- the parent

def build_parser() -> argparse.ArgumentParser:
    from utils.sample.args import add_size_args
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group('models (random weights unless --var_ckpt)')
    m.add_argument('--models', type=str, default='VAR,VIAR', help='which of VAR, VIAR to run (a checkpoint fixes it)')
    m.add_argument('--depth', type=int, default=16)
    m.add_argument('--pre_depth', type=int, default=5, help='VIAR explicit blocks before the implicit block')
    m.add_argument('--post_depth', type=int, default=5, help='VIAR explicit blocks after it')
    m.add_argument('--p_depth', type=int, default=None, help='sets both --pre_depth and --post_depth')
    m.add_argument('--var_ckpt', type=str, default='', help='transformer checkpoint (slim export or official file)')
    m.add_argument('--vae_ckpt', type=str, default='', help='VQVAE checkpoint (default: random tokenizer weights)')
    m.add_argument('--seed', type=int, default=0, help='seed of the random weights')
    add_size_args(p)
    s = p.add_argument_group('sampling')
    s.add_argument('--schedules', type=str, default=DEFAULT_SCHEDULES,
                   help="comma list: 'A:B' = official linspace(A, B) knob; 'tau=X' or 'tau=json' = adaptive")
    s.add_argument('--tau_cap', type=int, default=20, help='adaptive: iteration cap per scale')
    s.add_argument('--tau_json', type=str, default='', help="per-scale tau for 'tau=json' (convergence.py output)")
    s.add_argument('--stop_mode', type=str, default='rel', choices=('rel', 'abs'))
    s.add_argument('--bs', type=int, default=4, help='images per call (the CFG batch is twice this)')
    s.add_argument('--cfg', type=float, default=1.5)
    s.add_argument('--top_k', type=int, default=900)
    s.add_argument('--top_p', type=float, default=0.96)
    s.add_argument('--g_seed', type=int, default=0, help='sampling seed (same images every call)')
    s.add_argument('--official_kv', action='store_true', help='fill_forward=False (official KV behaviour)')
    r = p.add_argument_group('run')
    r.add_argument('--dtype', type=str, default='fp32', choices=('fp32', 'bf16', 'fp16'), help='autocast dtype')
    r.add_argument('--device', type=str, default='', help='cpu, cuda, cuda:1; default cuda when available')
    r.add_argument('--threads', type=int, default=0, help='torch threads per child (0: torch default)')
    r.add_argument('--compile', action='store_true', help='torch.compile the project side (utils/sample/compile_util.py)')
    r.add_argument('--warmup', type=int, default=1, help='untimed calls per child first')
    r.add_argument('--reps', type=int, default=3, help='timed calls per child')
    r.add_argument('--official', type=str, default='', metavar='PATH',
                   help='also run the official implementation from this checkout, side by side')
    r.add_argument('--profile', action='store_true',
                   help='also profile one call per side (torch.profiler) into sample_speed_profile.md')
    r.add_argument('--out', type=str, default='bench_out')
    return p


def model_spec(args, use_implicit: bool):
    """ModelSpec from the flags for one model kind."""
    from utils.model_io import ModelSpec
    spec = ModelSpec(depth=args.depth, use_implicit=use_implicit, pre_depth=args.pre_depth, post_depth=args.post_depth)
    for field_name, flag in dict(embed_dim='width', num_heads='heads', patch_nums='patch_nums', V='V', Cvae='Cvae',
                                 vae_ch='vae_ch', vae_ch_mult='vae_ch_mult', vae_num_res_blocks='vae_num_res_blocks',
                                 num_classes='num_classes').items():
        if getattr(args, flag, None) is not None:
            setattr(spec, field_name, getattr(args, flag))
    return spec


def write_state(args, kind: str, tmpdir: str):
    """Build (or load) one model pair, save both state dicts for the children; returns (spec, path)."""
    import torch
    from utils.model_io import load_models, build_models
    if args.var_ckpt:
        vae, var, spec = load_models(args.var_ckpt, args.vae_ckpt, model_spec(args, kind == 'VIAR'), random_vae_ok=True)
    else:
        spec = model_spec(args, kind == 'VIAR')
        torch.manual_seed(args.seed)
        vae, var = build_models(spec, 'cpu')
        if args.vae_ckpt:
            from utils.checkpoint import load_vae_weights
            load_vae_weights(vae, args.vae_ckpt)
    path = os.path.join(tmpdir, f'{kind}.pt')
    torch.save({'vae': vae.state_dict(), 'var': var.state_dict()}, path)
    return spec, path


def run_config(args, spec, state_path: str, schedule: Dict[str, Any], device: str) -> Dict[str, Any]:
    """One config: start the children, warm up, alternate timed calls, collect memory; one result row."""
    from bench.measure import Child
    env = dict(os.environ)
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    msg = dict(model=spec.to_dict(), state_path=state_path, schedule=schedule, B=args.bs, dtype=args.dtype,
               device=device, threads=args.threads, g_seed=args.g_seed, cfg=args.cfg, top_k=args.top_k,
               top_p=args.top_p, fill_forward=not args.official_kv, compile=args.compile)
    kids = {'ours': Child([sys.executable, os.path.abspath(__file__), '--serve'], 'project', env=env, cwd=ROOT)}
    if args.official and schedule['tau'] is None:
        kids['official'] = Child([sys.executable, os.path.join(ROOT, 'bench', 'official_runner.py'),
                                  os.path.abspath(args.official)], 'official', env=env, cwd=ROOT)
    try:
        built = {k: c.ask(cmd='setup', **msg) for k, c in kids.items()}
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
    row = dict(model='VIAR' if spec.use_implicit else 'VAR', schedule=schedule['label'] if spec.use_implicit else '-',
               counts=schedule['counts'] if spec.use_implicit else None)
    for k in kids:
        last = reps[k][-1]
        row[k] = dict(summarise(reps[k], args.bs, timing_basis(device, args.threads)),
                      kv_cache_bytes=last['kv_cache_bytes'], digest=last['digest'],
                      rss_after_build_bytes=built[k]['rss_after_build_bytes'], **mem[k])
        if k in prof:
            row[k]['profile'] = prof[k]
    row['iters_used'] = reps['ours'][-1]['iters'] if spec.use_implicit else None
    if 'official' in row:
        row['ratio'] = ratio(row['ours']['images_per_s'], row['official']['images_per_s'])
        row['transformer_ratio'] = ratio(row['ours']['transformer_images_per_s'], row['official']['transformer_images_per_s'])
        for clock in ('wall', 'cpu'):
            row[f'{clock}_ratio'] = ratio(row['ours'][f'{clock}_images_per_s'], row['official'][f'{clock}_images_per_s'])
            row[f'{clock}_transformer_ratio'] = ratio(row['ours'][f'{clock}_transformer_images_per_s'],
                                                      row['official'][f'{clock}_transformer_images_per_s'])
        row['same_images'] = row['ours']['digest'] == row['official']['digest']
    return row


def machine_name() -> str:
    """CPU model and core count, or the GPU name."""
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{name}, {os.cpu_count()} cores'


def main(argv=None):
    import torch
    from utils.sample.args import resolve_device
    args = build_parser().parse_args(argv)
    if args.p_depth is not None:
        args.pre_depth = args.post_depth = args.p_depth
    device = resolve_device(args.device)
    if args.compile and args.warmup < 1:
        raise SystemExit('--compile needs --warmup >= 1: the first call compiles')
    if args.official and not os.path.isdir(os.path.join(args.official, 'models')):
        raise SystemExit(f'--official {args.official}: not a checkout of the official code (no models/ folder there)')
    kinds = [k.strip().upper() for k in args.models.split(',') if k.strip()]
    if not kinds or any(k not in ('VAR', 'VIAR') for k in kinds):
        raise SystemExit(f'--models must list VAR and/or VIAR, got {args.models!r}')
    tokens = [t for t in args.schedules.split(',') if t.strip()]
    try:   # fail on a bad token before any model is built
        [parse_schedule(t, len(model_spec(args, True).patch_nums), args.tau_cap, args.tau_json, args.stop_mode)
         for t in tokens]
    except ValueError as e:
        raise SystemExit(f'--schedules: {e}') from None
    os.makedirs(args.out, exist_ok=True)
    load_start = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory(prefix='sample_speed_') as tmp:
        for kind in kinds:
            spec, state_path = write_state(args, kind, tmp)
            if args.var_ckpt and (kind == 'VIAR') != spec.use_implicit:
                print(f'skipping {kind}: the checkpoint is a {"VIAR" if spec.use_implicit else "VAR"}', file=sys.stderr)
                continue
            K = len(spec.patch_nums)
            try:
                scheds = [parse_schedule(t, K, args.tau_cap, args.tau_json, args.stop_mode)
                          for t in tokens] if kind == 'VIAR' else \
                    [dict(label='-', counts=[0] * K, tau=None, stop_mode='rel', left=0, right=0)]
            except ValueError as e:
                raise SystemExit(f'--schedules: {e}') from None
            for sched in scheds:
                print(f'[sample_speed] {kind} {sched["label"]} ...', file=sys.stderr, flush=True)
                rows.append(run_config(args, spec, state_path, sched, str(device)))
                print(f'[sample_speed]   ours {rows[-1]["ours"]["images_per_s"]:.3f} img/s'
                      + (f', official {rows[-1]["official"]["images_per_s"]:.3f} img/s' if rows[-1].get('official') else ''),
                      file=sys.stderr, flush=True)
    last_spec = spec
    meta = dict(machine=torch.cuda.get_device_name(device) if device.type == 'cuda' else machine_name(),
                device=str(device), threads=args.threads or torch.get_num_threads(), dtype=args.dtype, B=args.bs,
                depth=last_spec.depth, width=last_spec.embed_dim or 64 * last_spec.depth,
                pre_depth=last_spec.pre_depth, post_depth=last_spec.post_depth, patch_nums=list(last_spec.patch_nums),
                image_px=last_spec.patch_nums[-1] * 2 ** (len(last_spec.vae_ch_mult) - 1), var_ckpt=args.var_ckpt,
                warmup=args.warmup, reps=args.reps, compile=args.compile, official=args.official or None,
                basis=timing_basis(str(device), args.threads),
                cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, fill_forward=not args.official_kv,
                load_avg=f"{load_start} -> {' '.join(f'{x:.1f}' for x in os.getloadavg())}", torch=torch.__version__)
    result = dict(meta=meta, rows=rows)
    with open(os.path.join(args.out, 'sample_speed.json'), 'w') as f:
        json.dump(result, f, indent=1)
    table = markdown_table(result)
    with open(os.path.join(args.out, 'sample_speed.md'), 'w') as f:
        f.write(table)
    plot(result, os.path.join(args.out, 'sample_speed.png'))
    if args.profile:
        with open(os.path.join(args.out, 'sample_speed_profile.md'), 'w') as f:
            f.write(profile_table(result))
    print(table)
    return result


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        from bench import measure
        measure.serve(_our_handlers())
    else:
        main()
