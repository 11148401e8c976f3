"""Does --fast change sample quality? FID on digit features of the demo's VIAR, exact fp32 vs --fast, over seed sets.

    DEMO_OUT=/work/demo_fast bash scripts/demo.sh          # a trained demo (minutes)
    python bench/fast_fid.py --demo /work/demo_fast --sets 5 --seeds 20 --out bench_out/fast_fid

Samples every class with `gen_img.py` (the demo's sampling settings) once per seed set and per path, and scores each
set with scripts/demo_score.py (FID / precision / recall in a digit-MLP's hidden layer, class consistency). --fast
passes when its FID lies within the spread (min..max) of the exact fp32 path's over the same seed sets. Not a test:
a measurement, written to OUT/fast_fid.json and printed.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, 'scripts')):
    if p not in sys.path:
        sys.path.insert(0, p)

PATHS = {'exact fp32': ['--dtype', 'fp32'], 'fast': ['--fast']}


def spread_verdict(fids_exact, fids_fast) -> dict:
    """Mean and range of each path's FIDs, and whether the fast mean lies within the exact path's range."""
    lo, hi = min(fids_exact), max(fids_exact)
    mean_fast = sum(fids_fast) / len(fids_fast)
    return dict(exact_min=lo, exact_max=hi, exact_mean=sum(fids_exact) / len(fids_exact), fast_mean=mean_fast,
                fast_min=min(fids_fast), fast_max=max(fids_fast), fast_within_exact_spread=lo <= mean_fast <= hi)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--demo', default='demo_output', help='a finished scripts/demo.sh output folder')
    p.add_argument('--sets', type=int, default=5, help='seed sets')
    p.add_argument('--seeds', type=int, default=20, help='seeds per class in one set (10 classes)')
    p.add_argument('--out', default='bench_out/fast_fid')
    args = p.parse_args(argv)
    import json

    import torch

    import demo_score
    import gen_img
    from utils.atomic import write_json_atomic
    from utils.sample.compile_util import fast_dtype
    torch.set_num_threads(1)
    with open(os.path.join(args.demo, 'results.json')) as f:
        s = json.load(f)['sample']
    judge, _ = demo_score.build_judge(os.path.join(args.demo, 'digits'), os.path.join(args.demo, 'vae', 'vae.pth'))
    rows = {name: [] for name in PATHS}
    for k in range(args.sets):
        seeds = [str(k * args.seeds + i) for i in range(args.seeds)]
        for name, flags in PATHS.items():
            out = os.path.join(args.out, name.replace(' ', '_'), f'set{k}')
            gen_img.main(['--var_ckpt', os.path.join(args.demo, 'viar', 'viar-slim.pth'), '--vae_ckpt',
                          os.path.join(args.demo, 'vae', 'vae.pth'), '--class_label', *map(str, range(10)),
                          '--seeds', *seeds, '--cfg', str(s['cfg']), '--top_k', str(s['top_k']), '--top_p',
                          str(s['top_p']), '--iter_left', str(s['iter_left']), '--iter_right', str(s['iter_right']),
                          '--batch_size', '50', '--device', 'cpu', '--progress', 'False', '--output_dir', out, *flags])
            sc = demo_score.score_samples(judge, out)
            rows[name].append(dict(set=k, fid=sc['fid'], consistency=sc['consistency'], precision=sc['precision'],
                                   recall=sc['recall'], n=sc['n']))
            print(f'set {k} {name}: FID {sc["fid"]:.3f}, consistency {sc["consistency"]:.3f}', flush=True)
    result = dict(demo=args.demo, fast_dtype=fast_dtype('cpu'), sample=s, seeds_per_class=args.seeds, rows=rows,
                  verdict=spread_verdict([r['fid'] for r in rows['exact fp32']], [r['fid'] for r in rows['fast']]))
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(result, os.path.join(args.out, 'fast_fid.json'), indent=1)
    print(json.dumps(result['verdict'], indent=1))
    return result


if __name__ == '__main__':
    main()
