"""Validation loss over steps of several train.py runs, read from their log.txt, as one plot and a JSON.

    python bench/val_curves.py --run 'from scratch (seed 0)=/work/ft17/scratch_s0' \
        --run 'from the VAR (seed 0)=/work/ft17/fromvar_s0' --out docs/training/viar_from_var.png

Each --run is LABEL=FOLDER; the '[val] after step N ... Lm X Lt Y' lines of FOLDER/log.txt are the points.
"""
import argparse
import json
import os
import re
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VAL = re.compile(r'\[val\] after step (\d+) .*?Lm ([0-9.]+) Lt ([0-9.]+) Acc m&t ([0-9.]+) ([0-9.]+)')


def read_val(log_txt: str) -> List[Dict[str, float]]:
    """[{step, L_mean, L_tail, acc_mean, acc_tail}] in log order (a step validated twice keeps the last)."""
    out: Dict[int, Dict[str, float]] = {}
    with open(log_txt) as f:
        for line in f:
            m = VAL.search(line)
            if m:
                s = int(m.group(1))
                out[s] = dict(step=s, L_mean=float(m.group(2)), L_tail=float(m.group(3)), acc_mean=float(m.group(4)),
                              acc_tail=float(m.group(5)))
    return [out[s] for s in sorted(out)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--run', action='append', required=True, help='LABEL=FOLDER (repeat)')
    p.add_argument('--out', required=True, help='PNG to write; the JSON goes beside it')
    p.add_argument('--title', default='validation loss (mean CE over all tokens)')
    a = p.parse_args(argv)
    runs = {}
    for item in a.run:
        label, _, folder = item.partition('=')
        if not folder or not os.path.isfile(os.path.join(folder, 'log.txt')):
            raise SystemExit(f'--run {item!r}: expected LABEL=FOLDER with FOLDER/log.txt')
        runs[label] = read_val(os.path.join(folder, 'log.txt'))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from utils.atomic import atomic_path, write_json_atomic
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in runs.items():
        ax.plot([q['step'] for q in pts], [q['L_mean'] for q in pts], marker='o', ms=3, label=label,
                linestyle='--' if 'scratch' in label else '-')
    ax.set_xlabel('training step')
    ax.set_ylabel('validation cross-entropy (nats)')
    ax.set_title(a.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(a.out) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)
    write_json_atomic(runs, os.path.splitext(a.out)[0] + '.json')
    for label, pts in runs.items():
        print(f'{label}: ' + ', '.join(f"{q['step']}: {q['L_mean']:.4f}" for q in pts))


if __name__ == '__main__':
    main()
