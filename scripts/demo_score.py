"""Score the digits demo: class consistency, FID / precision / recall, diversity and copy rate of the VIAR and
VAR samples, tokenizer reconstruction, parameter counts, CPU times, a labelled sample grid and a headline.

    python scripts/demo_score.py --data_path demo_output/digits --vae_ckpt demo_output/vae/vae.pth \
        --viar_ckpt demo_output/viar/viar-slim.pth --viar_samples demo_output/samples/viar \
        --var_ckpt demo_output/var/var-slim.pth --var_samples demo_output/samples/var --out demo_output/results.json

Every image is box-averaged back to 8x8 grayscale in 0..1 (the digits' own resolution): the 64 pixel features
every judge sees (docs/DEMO.md). Samples are gen_img.py's `class{c}_seed{s}.png` under a folder, or a sampling.py
`.npz`.
"""
import argparse
import glob
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # as a script: the project

import demo_quality  # noqa: E402
from make_digits import DIGIT_MAX, DIGIT_SIDE  # noqa: E402
from utils.atomic import write_json_atomic  # noqa: E402
from utils.checkpoint import read_state_dict  # noqa: E402
from utils.data.datasets import build_datasets, load_rgb  # noqa: E402
from utils.sample.image_io import to_uint8_HWC, write_png  # noqa: E402
from utils.train.tokenizer_trainer import load_tokenizer, recon_mse  # noqa: E402

SAMPLE_RE = re.compile(r'^class(\d+)_seed(-?\d+)\.png$')
PARALLEL = {'transformers': 2, 'samples': 2}   # demo.sh stages that run VIAR and VAR as two processes side by side
BUFFERS = ('lvl_1L', 'attn_bias_for_masking', 'zero_k_bias', 'ema_vocab_hit_SV')  # state-dict keys that are not weights
RESULT_KEYS = {'consistency': 'class_consistency', 'n': 'n_samples'}   # score -> results.json prefix, if not its own


# ----------------------------------------------------------------------------- pure helpers
def to_digit_features(img_HWC: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W, 3) or (H, W) with H, W multiples of 8 -> 64 features in 0..16 (box average)."""
    gray_HW = img_HWC.astype(np.float64)
    if gray_HW.ndim == 3:
        gray_HW = gray_HW.mean(axis=2)
    H, W = gray_HW.shape
    if H % DIGIT_SIDE or W % DIGIT_SIDE:
        raise ValueError(f'image of {H}x{W} px cannot be box-averaged to {DIGIT_SIDE}x{DIGIT_SIDE}')
    small = gray_HW.reshape(DIGIT_SIDE, H // DIGIT_SIDE, DIGIT_SIDE, W // DIGIT_SIDE).mean(axis=(1, 3))
    return (small / 255.0 * DIGIT_MAX).reshape(-1)


def pixel_features(imgs_NHWC: np.ndarray) -> np.ndarray:
    """uint8 images -> (N, 64) box-averaged 8x8 levels scaled to 0..1: what every judge in the demo sees."""
    return np.stack([to_digit_features(im) for im in imgs_NHWC]) / DIGIT_MAX


def parse_sample_name(name: str) -> Optional[Tuple[int, int]]:
    """(class, seed) from a gen_img.py file name like 'class3_seed12.png', else None."""
    m = SAMPLE_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_bash_times(line: str) -> float:
    """User + system seconds from a line of bash's `times` output, e.g. '8m3.982s 0m19.473s' -> 503.455."""
    return sum(int(m.group(1)) * 60 + float(m.group(2)) for m in re.finditer(r'(\d+)m([\d.]+)s', line))


def stage_cpu_seconds(marks: Sequence[str]) -> Dict[str, float]:
    """CPU seconds of each stage from demo.sh's marks ('<stage> <bash `times` children line>', cumulative)."""
    out, before = {}, 0.0
    for line in marks:
        stage, _, rest = line.strip().partition(' ')
        total = parse_bash_times(rest)
        out[stage], before = round(total - before, 1), total
    return out


def quiet_wall_estimate(cpu_by_stage: Dict[str, float], parallel: Dict[str, int] = PARALLEL) -> float:
    """Wall seconds of the stages on an idle machine with a core per process: each stage's CPU time over the
    processes it runs side by side (VIAR and VAR cost about the same, so neither waits long for the other)."""
    return float(sum(cpu / parallel.get(stage, 1) for stage, cpu in cpu_by_stage.items()))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> Dict[int, float]:
    """Accuracy of predictions within each true class."""
    return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def count_params(state_dict) -> int:
    """Number of trainable values in a VAR / VIAR / VQVAE state dict (the buffers in BUFFERS excluded)."""
    return int(sum(v.numel() for k, v in state_dict.items() if not k.endswith(BUFFERS)))


def named_results(set_name: str, scores: Dict[str, object]) -> Dict[str, object]:
    """results.json keys of one scored set: '<figure>_<set name>', e.g. fid_viar, class_consistency_var."""
    return {f'{RESULT_KEYS.get(k, k)}_{set_name}': v for k, v in scores.items()}


def demo_tokenizer(data_path: str) -> str:
    """Where demo.sh keeps the tokenizer of a digits folder: `<data_path>/../vae/vae.pth`."""
    return os.path.normpath(os.path.join(data_path, os.pardir, 'vae', 'vae.pth'))


def resolve_vae_ckpt(flag: str, data_path: str, exists=os.path.isfile) -> str:
    """The tokenizer to score with: --vae_ckpt as given; 'none' = none (copies judged on raw pixels); unset = the
    demo's tokenizer beside --data_path when it exists, so every command scores as the demo does."""
    if flag:
        return '' if flag == 'none' else flag
    beside = demo_tokenizer(data_path)
    return beside if exists(beside) else ''


# ----------------------------------------------------------------------------- files
def read_results(path: str) -> Dict[str, object]:
    """The JSON object in a results file, {} when there is none yet."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge_results(path: str, keys: Dict[str, object]) -> Dict[str, object]:
    """Write `keys` into the results file at path (atomically), keeping the keys others wrote there."""
    results = dict(sorted(dict(read_results(path), **keys).items()))
    write_json_atomic(results, path)   # creates the folder
    return results


def load_folder_images(root: str) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, 3), labels (N,)) of an ImageFolder with numeric class folders (`root/<digit>/*.png`)."""
    found = [(int(c), p) for c in (sorted(os.listdir(root)) if os.path.isdir(root) else []) if c.isdigit()
             for p in sorted(glob.glob(os.path.join(root, c, '*.png')))]
    if not found:
        raise SystemExit(f'demo_score: no digit images in {root!r}; write them with scripts/make_digits.py')
    return np.stack([np.asarray(load_rgb(p)) for _, p in found]), np.array([c for c, _ in found])


def find_samples(root: str) -> List[Tuple[int, int, str]]:
    """[(class, seed, path)] of every gen_img.py `class{c}_seed{s}.png` under root."""
    found = [(*cs, path) for path in sorted(glob.glob(os.path.join(root, '**', 'class*_seed*.png'), recursive=True))
             if (cs := parse_sample_name(os.path.basename(path)))]
    if not found:
        raise SystemExit(f'demo_score: no generated images (class<c>_seed<s>.png) under {root!r}; run gen_img.py first')
    return found


def load_npz_samples(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, 3), classes (N,)) of a sampling.py `.npz`: image i is of class i // per_class, with
    per_class from the `.plan.json` in the image folder beside it."""
    try:
        with open(os.path.join(path[:-len('.npz')], '.plan.json')) as f:
            per_class = int(json.load(f)['per_class'])
        with np.load(path, allow_pickle=False) as z:
            imgs = z['arr_0']
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f'demo_score: cannot read {path} with its image folder\'s .plan.json ({e}); pass the .npz '
                         f'that sampling.py wrote, with its folder beside it') from None
    if imgs.ndim != 4 or imgs.dtype != np.uint8 or imgs.shape[-1] != 3:
        raise SystemExit(f'demo_score: {path} holds {imgs.dtype} {tuple(imgs.shape)}, not uint8 images N x H x W x 3')
    return imgs, np.arange(len(imgs)) // per_class


# ----------------------------------------------------------------------------- scoring
def tokenizer_reconstructions(vae, imgs_NHWC: np.ndarray, bs: int = 1024) -> np.ndarray:
    """Pixel features (N, 64) in 0..1 of uint8 images through the tokenizer, rounded as gen_img.py's PNGs: what a
    transformer that memorised a digit's tokens draws."""
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs_NHWC), bs):
            x_B3HW = torch.from_numpy(imgs_NHWC[i:i + bs]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            rec_B3HW = vae.img_to_reconstructed_img(x_B3HW, last_one=True).add(1).mul(0.5)
            out.extend(to_uint8_HWC(r) for r in rec_B3HW)
    return pixel_features(np.stack(out))


def build_judge(data_path: str, vae_ckpt: str = '', seed: int = 0):
    """(demo_quality.Judge of the real digits under data_path, {set name: (pixel features, labels)} of the floors):
    the real val digits ('real') and, with a tokenizer, their reconstructions ('recon'), the best a model drawing
    through it could do."""
    tr_imgs, tr_y = load_folder_images(os.path.join(data_path, 'train'))
    va_imgs, va_y = load_folder_images(os.path.join(data_path, 'val'))
    tr_rec = va_rec = None
    if vae_ckpt:
        vae, _ = load_tokenizer(vae_ckpt)
        tr_rec, va_rec = tokenizer_reconstructions(vae, tr_imgs), tokenizer_reconstructions(vae, va_imgs)
    va_x = pixel_features(va_imgs)
    judge = demo_quality.fit_judge(pixel_features(tr_imgs), tr_y, va_x, va_y, train_rec=tr_rec, val_rec=va_rec,
                                   seed=seed)
    floors = {'real': (va_x, va_y)}
    if va_rec is not None:
        floors['recon'] = (va_rec, va_y)
    return judge, floors


def judge_results(judge, floors) -> Dict[str, object]:
    """results.json keys that describe the judge and the floors it measures on real (and reconstructed) digits."""
    out = dict(classifier_acc_real=judge.classifier_acc_real, feature_net_acc_real=judge.feature_net_acc_real,
               feature_width=judge.net.coefs_[0].shape[1], n_ref_train=len(judge.train_h), n_real_val=len(judge.val_h),
               copy_threshold=judge.copy_threshold, copy_percentile=demo_quality.COPY_PERCENTILE,
               copy_space='pixels of tokenizer reconstructions' if 'recon' in floors else 'pixels')
    for name, (x_NP, y_N) in floors.items():
        out.update(named_results(name, demo_quality.score(judge, x_NP, y_N)))
    del out['class_consistency_real']   # that is classifier_acc_real
    if 'recon' in floors:
        # held-out digits are looked at for copies as samples are, through the tokenizer: about
        # COPY_PERCENTILE % by construction (the raw digits, sharper than any reconstruction, would score 0)
        out['copy_rate_real'] = out.pop('copy_rate_recon')
    return out


def score_samples(judge, samples: str) -> Dict[str, object]:
    """Every demo_quality figure, per-class consistency and the count of gen_img.py PNGs or a sampling.py .npz."""
    if samples.endswith('.npz'):
        imgs, classes = load_npz_samples(samples)
    else:
        found = find_samples(samples)
        imgs, classes = np.stack([np.asarray(load_rgb(p)) for _, _, p in found]), np.array([c for c, _, _ in found])
    x_MP = pixel_features(imgs)
    s = demo_quality.score(judge, x_MP, classes)
    s.update(n=len(imgs), per_class=per_class_accuracy(judge.clf.predict(x_MP), classes))
    return s


def tokenizer_mse(vae_ckpt: str, data_path: str) -> float:
    """Reconstruction MSE on [-1, 1] of the val images through the tokenizer file."""
    vae, arch = load_tokenizer(vae_ckpt)
    _, _, val_set = build_datasets(data_path, arch['reso'], arch['reso'])
    return recon_mse(vae, val_set)


# ----------------------------------------------------------------------------- the labelled grid
HEADER_PX = 16   # band over the blocks for the model names: Pillow's default font is about 10 px tall
LABEL_PX = 14    # column left of the blocks for each row's digit
INK = (0, 0, 0)


def sample_block(root: str, scale: int = 4, pad: int = 3, line: int = 110, max_seeds: int = 0
                 ) -> Tuple[np.ndarray, List[int], int]:
    """(uint8 block, its classes, tile height): rows = classes, columns = seeds (the first max_seeds, 0 = all) of
    one samples folder, upscaled; tiles `pad` px apart on gray (`line`) so neighbouring strokes do not merge."""
    found = find_samples(root)
    classes = sorted({c for c, _, _ in found})
    seeds = sorted({s for _, s, _ in found})[:max_seeds or None]
    where = {(c, s): p for c, s, p in found}
    first = load_rgb(found[0][2])
    h, w = first.height * scale, first.width * scale
    block = np.full((len(classes) * (h + pad) + pad, len(seeds) * (w + pad) + pad, 3), line, np.uint8)
    for i, c in enumerate(classes):
        for j, s in enumerate(seeds):
            if (c, s) in where:
                y, x = pad + i * (h + pad), pad + j * (w + pad)
                block[y:y + h, x:x + w] = np.asarray(load_rgb(where[(c, s)]).resize((w, h), Image.NEAREST))
    return block, classes, h


def block_offsets(widths: Sequence[int], gap: int, left: int) -> List[int]:
    """x of each block's left edge when blocks of these widths sit side by side, `gap` apart, from x = left."""
    return [left + sum(widths[:i]) + i * gap for i in range(len(widths))]


def labelled_size(block_hws: Sequence[Tuple[int, int]], gap: int, header: int = HEADER_PX, label: int = LABEL_PX
                  ) -> Tuple[int, int]:
    """(height, width) of the labelled grid: the tallest block under the header band, the label column first."""
    return (max(h for h, _ in block_hws) + header,
            label + sum(w for _, w in block_hws) + gap * (len(block_hws) - 1))


def comparison_grid(sample_dirs: Sequence[str], names: Sequence[str] = (), scale: int = 4, pad: int = 3,
                    gap: int = 12, line: int = 110, header: int = HEADER_PX, label: int = LABEL_PX,
                    max_seeds: int = 0) -> np.ndarray:
    """uint8 image: one `sample_block` per samples folder side by side, a header band naming each block (`names`)
    and a left column with each row's digit (every folder holds the same classes); Pillow's default font."""
    made = [sample_block(d, scale, pad, line, max_seeds) for d in sample_dirs]
    blocks = [b for b, _, _ in made]
    height, width = labelled_size([b.shape[:2] for b in blocks], gap, header, label)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    xs = block_offsets([b.shape[1] for b in blocks], gap, label)
    for x, b in zip(xs, blocks):
        canvas.paste(Image.fromarray(b), (x, header))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for x, b, name in zip(xs, blocks, names):
        draw.text((x + b.shape[1] / 2, header / 2), name, fill=INK, font=font, anchor='mm')
    _, classes, tile_h = made[0]
    for i, c in enumerate(classes):
        draw.text((label / 2, header + pad + i * (tile_h + pad) + tile_h / 2), str(c), fill=INK, font=font,
                  anchor='mm')
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- what a person reads at the end
HEADLINE_SETS = (('real', 'real val digits (floor)'), ('recon', 'tokenizer round trip (floor)'), ('viar', 'VIAR'),
                 ('var', 'VAR'))   # results.json suffix, row name; rows whose FID is absent are left out


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.1f} min'


def headline(results: Dict[str, object], results_path: str) -> str:
    """The end of a demo run in a few lines: what was trained and sampled, each model's figures beside the floors,
    where the grid and results are, what to try next; keys a run did not write leave their line out."""
    r = results
    lines = []
    if 'ar_steps' in r:
        models = ' and '.join(f'{name} ({r[f"params_{key}"]:,} params)' if f'params_{key}' in r else name
                              for key, name in (('viar', 'VIAR'), ('var', 'VAR')))
        tok = f"tokenizer {r['vae_steps']} steps" + (f" (val MSE {r['recon_mse']:.3f})" if 'recon_mse' in r else '')
        lines.append("demo: VIAR beside VAR on scikit-learn's handwritten digits, 16 px, on a CPU")
        lines.append(f"trained: {tok}, then {models}, {r['ar_steps']} steps each, width {r.get('width', '?')}"
                     + ('; DEMO_QUICK=1: a smoke test of the pipeline, not of the models' if r.get('quick') else ''))
    sample = r.get('sample')
    if isinstance(sample, dict):
        lines.append(f"sampled: {sample.get('seeds_per_class')} images per digit and model, cfg {sample.get('cfg')}, "
                     f"VIAR iterations per scale {sample.get('iter_left')}..{sample.get('iter_right')}")
    rows = [(name, key) for key, name in HEADLINE_SETS if f'fid_{key}' in r]
    if rows:
        width = max(len(name) for name, _ in rows)
        lines.append(f"{'':<{width}}  {'FID':>6}  {'precision':>9}  {'recall':>6}  {'class consistency':>17}")
        for name, key in rows:
            consistency = r.get('classifier_acc_real') if key == 'real' else r.get(f'class_consistency_{key}')
            cells = [f"{r[f'fid_{key}']:6.2f}"] + [
                f'{v:{w}.2f}' if isinstance(v, (int, float)) else f"{'-':>{w}}"
                for v, w in ((r.get(f'precision_{key}'), 9), (r.get(f'recall_{key}'), 6), (consistency, 17))]
            lines.append(f'{name:<{width}}  ' + '  '.join(cells))
        lines.append('FID: lower is better (0 = the train digits\' own statistics); precision, recall and class '
                     'consistency: higher is better, up to the floors (docs/DEMO.md, "What the scores mean")')
    if r.get('grid'):
        lines.append(f"grid: {r['grid']} (VIAR left, VAR right; rows = digits 0..9, columns = seeds)")
    lines.append(f'every figure: {results_path}')
    if 'seconds' in r:
        lines.append(f"took {_minutes(r['seconds'])}" + (f", {_minutes(r['cpu_seconds'])} of CPU time"
                                                         if 'cpu_seconds' in r else ''))
    if 'ar_steps' in r:
        lines.append('next: README.md, "Next: explore the demo\'s models" (iterations, adaptive stopping, '
                     'in-painting, FID, speed)')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description='Score the digits demo (see docs/DEMO.md).')
    p.add_argument('--data_path', required=True, help='the image folder of make_digits.py (train/ and val/)')
    p.add_argument('--vae_ckpt', default='',
                   help="tokenizer file: reconstruction MSE, and the copy reference (copies are judged among its "
                        "reconstructions); default: the demo's, DATA_PATH/../vae/vae.pth, when it exists; "
                        "'none': judge copies on raw pixels")
    p.add_argument('--viar_ckpt', default='', help='VIAR checkpoint (for its parameter count)')
    p.add_argument('--viar_samples', default='', help='VIAR samples: a gen_img.py folder or a sampling.py .npz')
    p.add_argument('--var_ckpt', default='', help='VAR checkpoint (for its parameter count)')
    p.add_argument('--var_samples', default='', help='VAR samples: a gen_img.py folder or a sampling.py .npz')
    p.add_argument('--grid', default='', help='write an upscaled, labelled VIAR | VAR sample grid PNG here')
    p.add_argument('--grid_seeds', type=int, default=10, help='columns (the first seeds) of each half of the grid')
    p.add_argument('--started_at', type=float, default=None,
                   help='Unix time the run began; `seconds` = from then until the scores are written')
    p.add_argument('--cpu_times', default='', help="demo.sh's CPU marks: '<stage> <bash times children line>' a line")
    p.add_argument('--extra', default='{}', help='JSON object of further keys to record')
    p.add_argument('--out', default='demo_output/results.json')
    args = p.parse_args(argv)

    results = json.loads(args.extra)
    vae_ckpt = resolve_vae_ckpt(args.vae_ckpt, args.data_path)
    if vae_ckpt and not args.vae_ckpt:
        print(f"demo_score: the demo's tokenizer {vae_ckpt} (beside --data_path): copies are judged among its "
              f"reconstructions, as the demo judges its own samples")
    judge, floors = build_judge(args.data_path, vae_ckpt)
    results.update(judge_results(judge, floors))
    if vae_ckpt:
        results['recon_mse'] = tokenizer_mse(vae_ckpt, args.data_path)
    for name, ckpt, samples in (('viar', args.viar_ckpt, args.viar_samples), ('var', args.var_ckpt, args.var_samples)):
        if samples:
            results.update(named_results(name, score_samples(judge, samples)))
        if ckpt:
            results[f'params_{name}'] = count_params(read_state_dict(ckpt))
    if args.grid:
        dirs = [(n, d) for n, d in (('VIAR', args.viar_samples), ('VAR', args.var_samples)) if d]
        write_png(comparison_grid([d for _, d in dirs], [n for n, _ in dirs], max_seeds=args.grid_seeds), args.grid)
        results['grid'] = args.grid
    if args.started_at is not None:
        results['seconds'] = round(time.time() - args.started_at, 1)
    if args.cpu_times:
        with open(args.cpu_times) as f:
            stages = stage_cpu_seconds(f.read().splitlines())
        stages['scores'] = round(time.process_time(), 1)     # this process: single-threaded numpy / torch
        results.update(cpu_seconds_by_stage=stages, cpu_seconds=round(sum(stages.values()), 1),
                       quiet_estimate_seconds=round(quiet_wall_estimate(stages), 1))
    results['load_average_end'] = ' '.join(f'{x:.2f}' for x in os.getloadavg())
    print(headline(merge_results(args.out, results), args.out))


if __name__ == '__main__':
    main()
