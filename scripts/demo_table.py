"""The paper's schedule table at demo scale: the demo's VIAR under several implicit-iteration schedules, and
its VAR, each sampled over several seed sets, scored like the demo (scripts/demo_quality.py) and timed.

    bash scripts/demo.sh && .venv/bin/python scripts/demo_table.py --out_dir demo_output --plot docs/demo/pareto.png
    DEMO_TABLE=1 bash scripts/demo.sh          # the same, as the demo's last stage (plot in demo_output/)

A row is a setting (model, cfg, top-k, top-p, iteration knob) sampled once per seed set; every figure is reported
as mean, std and range over the sets, the seed-to-seed spread that says which differences the demo can resolve.
The table is merged into `<out_dir>/results.json` as `schedule_table` and printed as markdown; docs/DEMO.md tells
the protocol.
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # as a script: the project

import demo_quality  # noqa: E402
import demo_score  # noqa: E402
from bench.measure import table  # noqa: E402
from models.schedules import knob_name, linspace_iters  # noqa: E402
from utils.model_io import load_models  # noqa: E402
from utils.sample.compile_util import Sampler  # noqa: E402
from utils.sample.generate import generate, image_list  # noqa: E402
from utils.sample.image_io import to_uint8_HWC  # noqa: E402

CLASSES = tuple(range(10))
FIGURES = ('fid', 'precision', 'recall', 'consistency', 'diversity', 'copy_rate', 'images_per_s', 'images_per_s_wall')
DEFAULT_ROWS = ('viar:iters=1-1', 'viar:iters=2-2', 'viar:iters=4-4', 'viar:iters=8-8', 'viar:iters=4-1',
                'viar:iters=8-2', 'var')
TABLE_HEAD = ('row', 'cfg / top-k / top-p', 'iterations per scale', 'FID', 'precision', 'recall', 'consistency',
              'diversity', 'copy rate', 'images/s (CPU)', 'images/s (wall)')   # the setting's columns, then FIGURES


# ----------------------------------------------------------------------------- pure helpers
@dataclass(frozen=True)
class Setting:
    """How one row samples: which model, guidance, filtering and (VIAR) iteration knob."""
    model: str              # 'viar' or 'var'
    cfg: float
    top_k: int
    top_p: float
    iter_left: int = 4
    iter_right: int = 4

    @property
    def label(self) -> str:
        """'VIAR Con.(4,4)' / 'VAR': the schedule only where it changes the samples."""
        return 'VAR' if self.model == 'var' else f'VIAR {knob_name(self.iter_left, self.iter_right)}'


def parse_setting(text: str, base: Setting) -> Setting:
    """'viar:iters=8-2,cfg=1' -> base with those fields replaced (keys: iters, cfg, top_k, top_p)."""
    model, _, rest = text.partition(':')
    if model not in ('viar', 'var'):
        raise ValueError(f'a row starts with viar or var, got {text!r}')
    fields = dict(model=model)
    for item in filter(None, rest.split(',')):
        key, _, value = item.partition('=')
        if key == 'iters':
            left, _, right = value.partition('-')
            fields.update(iter_left=int(left), iter_right=int(right or left))
        elif key in ('cfg', 'top_p'):
            fields[key] = float(value)
        elif key == 'top_k':
            fields[key] = int(value)
        else:
            raise ValueError(f'unknown key {key!r} in row {text!r} (iters, cfg, top_k, top_p)')
    return replace(base, **fields)


def seed_sets(n_sets: int, per_class: int) -> List[List[int]]:
    """Disjoint seed lists: set i is seeds i*per_class .. (i+1)*per_class - 1 (set 0 = the demo's seeds)."""
    return [list(range(i * per_class, (i + 1) * per_class)) for i in range(n_sets)]


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample std (0 for one value), min and max of one figure over the seed sets."""
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                min=float(v.min()), max=float(v.max()))


def pareto_front(fid_R: Sequence[float], speed_R: Sequence[float]) -> List[int]:
    """Rows no other row beats on both axes (lower FID and higher images/s, at least as good on both)."""
    rows = range(len(fid_R))
    return [i for i in rows if not any(fid_R[j] <= fid_R[i] and speed_R[j] >= speed_R[i]
                                       and (fid_R[j], speed_R[j]) != (fid_R[i], speed_R[i]) for j in rows)]


def resolvable(a: Dict[str, float], b: Dict[str, float]) -> bool:
    """Whether two rows' means differ by more than the larger seed-to-seed std of the two, twice over."""
    return abs(a['mean'] - b['mean']) > 2 * max(a['std'], b['std'])


def markdown_table(rows: List[Dict[str, object]]) -> str:
    """The table as markdown: mean +- std over the seed sets for every figure."""
    body = []
    for r in rows:
        st = r['setting']
        cells = [r['label'], f"{st['cfg']:g} / {st['top_k']} / {st['top_p']:g}",
                 ','.join(map(str, r['iters'])) if r['iters'] else '-']
        for fig in FIGURES:
            digits = 0 if fig.startswith('images') else 2 if fig == 'fid' else 3
            cells.append(f"{r[fig]['mean']:.{digits}f} ± {r[fig]['std']:.{digits}f}")
        body.append(cells)
    return table(TABLE_HEAD, body)


# ----------------------------------------------------------------------------- sampling and scoring
def sample_features(var, setting: Setting, plan: Sequence[Tuple[int, int]], batch_size: int
                    ) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """(pixel features (M, 64) in 0..1, classes (M,), CPU seconds, wall seconds) of the plan's images, drawn as
    gen_img.py draws them; this process's CPU seconds on one thread are what an idle core would take."""
    sample_kw = {k: v for k, v in asdict(setting).items() if k != 'model'}
    c0, t0 = time.process_time(), time.perf_counter()
    img_M3HW, _ = generate(Sampler(var), plan, batch_size, sample_kw, progress=False)
    imgs = np.stack([to_uint8_HWC(im) for im in img_M3HW])
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return demo_score.pixel_features(imgs), np.array([c for c, _ in plan]), cpu, wall


def measure(var, judge, setting: Setting, seeds: Sequence[int], batch_size: int, reference: str,
            classes: Sequence[int] = CLASSES) -> Dict[str, float]:
    """Every figure of one setting on one seed set."""
    x_MP, labels_M, cpu, wall = sample_features(var, setting, image_list(classes, seeds), batch_size)
    s = demo_quality.score(judge, x_MP, labels_M, reference=reference)
    s.update(images_per_s=len(x_MP) / cpu, images_per_s_wall=len(x_MP) / wall)
    return s


def summarise_row(setting: Setting, per_set: List[Dict[str, float]], num_scales: int, n_per_set: int
                  ) -> Dict[str, object]:
    """A table row: the setting, its iteration counts, each set's figures and their spread."""
    iters = linspace_iters(setting.iter_left, setting.iter_right, num_scales) if setting.model == 'viar' else []
    row = dict(label=setting.label, setting=asdict(setting), n_per_set=n_per_set, iters=iters,
               per_set={fig: [s[fig] for s in per_set] for fig in FIGURES})
    row.update({fig: spread(row['per_set'][fig]) for fig in FIGURES})
    return row


def run_table(models: Dict[str, object], judge, settings: Sequence[Setting], sets: List[List[int]], batch_size: int,
              reference: str, classes: Sequence[int] = CLASSES, log=print) -> List[Dict[str, object]]:
    """All rows, seed set by seed set, every row in turn, so a change in the machine's load slows all rows alike."""
    per_row = [[] for _ in settings]
    for k, seeds in enumerate(sets):
        for i, setting in enumerate(settings):
            per_row[i].append(measure(models[setting.model], judge, setting, seeds, batch_size, reference, classes))
            m = per_row[i][-1]
            log(f"set {k}: {setting.label:>16}: FID {m['fid']:.3f}, precision {m['precision']:.3f}, recall "
                f"{m['recall']:.3f}, diversity {m['diversity']:.3f}, {m['images_per_s']:.0f} img/s")
    return [summarise_row(s, per_row[i], len(models[s.model].patch_nums), len(classes) * len(sets[0]))
            for i, s in enumerate(settings)]


def plot_pareto(rows: List[Dict[str, object]], path: str, title: str):
    """FID against images/s, mean +- std over the seed sets, the Pareto front joined by a line."""
    import matplotlib   # here, not at the top: only the plot needs it, and it is slow to import
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        marker, color = ('s', 'tab:orange') if r['setting']['model'] == 'var' else ('o', 'tab:blue')
        ax.errorbar(r['images_per_s']['mean'], r['fid']['mean'], xerr=r['images_per_s']['std'],
                    yerr=r['fid']['std'], fmt=marker, color=color, capsize=3)
        ax.annotate(r['label'].replace('VIAR ', ''), (r['images_per_s']['mean'], r['fid']['mean']),
                    textcoords='offset points', xytext=(5, 5), fontsize=8)
    front = sorted(pareto_front([r['fid']['mean'] for r in rows], [r['images_per_s']['mean'] for r in rows]),
                   key=lambda i: rows[i]['images_per_s']['mean'])
    ax.plot([rows[i]['images_per_s']['mean'] for i in front], [rows[i]['fid']['mean'] for i in front],
            '--', color='gray', lw=1, label='Pareto front (means)')
    ax.plot([], [], 'o', color='tab:blue', label='VIAR (schedule)')
    ax.plot([], [], 's', color='tab:orange', label='VAR')
    ax.set_xlabel('images per CPU second (1 thread, decode included)')
    ax.set_ylabel('FID (digit-classifier features)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description='Schedule table of the digits demo (see docs/DEMO.md).')
    p.add_argument('--out_dir', default='demo_output', help='a finished demo run (digits/, vae/, viar/, var/)')
    p.add_argument('--rows', nargs='+', default=list(DEFAULT_ROWS),
                   help="settings, e.g. viar:iters=8-2 var viar:iters=4-4,cfg=1,top_k=16 (others from the flags)")
    p.add_argument('--cfg', type=float, default=None, help="default: the demo run's own (its results.json)")
    p.add_argument('--top_k', type=int, default=None)
    p.add_argument('--top_p', type=float, default=None)
    p.add_argument('--n_sets', type=int, default=5, help='seed sets per row')
    p.add_argument('--per_class', type=int, default=None, help="seeds per class in a set; default the demo run's")
    p.add_argument('--batch_size', type=int, default=50)
    p.add_argument('--threads', type=int, default=1, help='torch threads (the demo samples on one per model)')
    p.add_argument('--reference', choices=('train', 'val'), default='train',
                   help='real digits every figure is measured against (val: the split defaults were chosen on)')
    p.add_argument('--key', default='schedule_table', help='results.json key ("" = do not write results.json)')
    p.add_argument('--plot', default='', help='Pareto plot PNG (default <out_dir>/pareto.png; "none" = no plot)')
    p.add_argument('--markdown', default='', help='also write the markdown table here')
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    res_path = os.path.join(args.out_dir, 'results.json')
    sample = demo_score.read_results(res_path).get('sample', {})
    base = Setting('viar', cfg=args.cfg if args.cfg is not None else sample.get('cfg', 1.5),
                   top_k=args.top_k if args.top_k is not None else sample.get('top_k', 0),
                   top_p=args.top_p if args.top_p is not None else sample.get('top_p', 0.0),
                   iter_left=sample.get('iter_left', 4), iter_right=sample.get('iter_right', 4))
    per_class = args.per_class or sample.get('seeds_per_class', 10)
    settings = [parse_setting(r, base) for r in args.rows]
    vae_ckpt = os.path.join(args.out_dir, 'vae', 'vae.pth')
    judge, _ = demo_score.build_judge(os.path.join(args.out_dir, 'digits'), vae_ckpt)
    models = {m: load_models(os.path.join(args.out_dir, m, f'{m}-slim.pth'), vae_ckpt, device='cpu')[1]
              for m in sorted({s.model for s in settings})}
    sets = seed_sets(args.n_sets, per_class)
    load_before = os.getloadavg()[0]
    rows = run_table(models, judge, settings, sets, args.batch_size, args.reference,
                     log=lambda line: print(line, flush=True))
    for r in rows:
        same = [o['label'] for o in rows if o is not r and not resolvable(r['fid'], o['fid'])]
        print(f"{r['label']}: FID {r['fid']['mean']:.3f} ± {r['fid']['std']:.3f}; within twice the larger "
              f"seed-to-seed std of: {', '.join(same) or 'none'}")
    meta = dict(reference=args.reference, n_sets=args.n_sets, per_class=per_class, threads=args.threads,
                batch_size=args.batch_size, load_average=[load_before, os.getloadavg()[0]])
    markdown = markdown_table(rows)
    print(f"\n{markdown}\n\n{args.n_sets} seed sets x {len(CLASSES) * per_class} images a row, reference: "
          f"{args.reference} digits; load average {load_before:.2f} -> {meta['load_average'][1]:.2f}")
    if args.key:
        demo_score.merge_results(res_path, {args.key: dict(meta, rows=rows)})
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown + '\n')
    if args.plot != 'none':
        plot_pareto(rows, args.plot or os.path.join(args.out_dir, 'pareto.png'),
                    f'digits demo: {args.n_sets} seed sets x {len(CLASSES) * per_class} images, '
                    f'reference {args.reference}, cfg {base.cfg:g}, top-k {base.top_k}, top-p {base.top_p:g}')


if __name__ == '__main__':
    main()
