"""Score the digits demo: tokenizer reconstruction, class consistency of VIAR / VAR samples, parameter counts.

    python scripts/demo_score.py --data_path demo_output/digits --vae_ckpt demo_output/vae/vae.pth \
        --viar_ckpt demo_output/viar/slim.pth --viar_samples demo_output/samples/viar \
        --var_ckpt demo_output/var/slim.pth --var_samples demo_output/samples/var --out demo_output/results.json

Class consistency = accuracy, on generated images, of a logistic-regression classifier trained on the
real training digits; every image is box-averaged back to 8x8 grayscale in the digits' 0..16 range.
Generated files are found by gen_img.py's names (`class{c}_seed{s}.png`) anywhere under a samples folder.
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

DIGIT_SIDE = 8
DIGIT_MAX = 16.0
SAMPLE_RE = re.compile(r'^class(\d+)_seed(-?\d+)\.png$')


# ----------------------------------------------------------------------------- pure helpers
def to_digit_features(img_HWC: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W, 3) or (H, W) with H, W multiples of 8 -> 64 features in 0..16 (box average)."""
    gray_HW = img_HWC.astype(np.float64)
    if gray_HW.ndim == 3:
        gray_HW = gray_HW.mean(axis=2)
    H, W = gray_HW.shape
    if H % DIGIT_SIDE or W % DIGIT_SIDE:
        raise ValueError(f'image of {H}x{W} px cannot be box-averaged to {DIGIT_SIDE}x{DIGIT_SIDE}')
    r, c = H // DIGIT_SIDE, W // DIGIT_SIDE
    small = gray_HW.reshape(DIGIT_SIDE, r, DIGIT_SIDE, c).mean(axis=(1, 3))
    return (small / 255.0 * DIGIT_MAX).reshape(-1)


def parse_sample_name(name: str) -> Optional[Tuple[int, int]]:
    """(class, seed) from a gen_img.py file name like 'class3_seed12.png', else None."""
    m = SAMPLE_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_bash_times(line: str) -> float:
    """User + system seconds from a line of bash's `times` output, e.g. '8m3.982s 0m19.473s' -> 503.455."""
    total = 0.0
    for m in re.finditer(r'(\d+)m([\d.]+)s', line):
        total += int(m.group(1)) * 60 + float(m.group(2))
    return total


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> Dict[int, float]:
    """Accuracy of predictions within each true class."""
    return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


BUFFERS = ('lvl_1L', 'attn_bias_for_masking', 'zero_k_bias', 'ema_vocab_hit_SV')  # state-dict keys that are not weights


def count_params(state_dict) -> int:
    """Number of trainable values in a VAR / VIAR / VQVAE state dict (the buffers in BUFFERS excluded)."""
    return int(sum(v.numel() for k, v in state_dict.items() if not k.endswith(BUFFERS)))


# ----------------------------------------------------------------------------- file reading
def load_image(path: str) -> np.ndarray:
    """A PNG as uint8 RGB (H, W, 3)."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def load_folder_features(root: str) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, 64), labels (N,)) of an ImageFolder with numeric class folders (`root/<digit>/*.png`)."""
    feats, labels = [], []
    for cls in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not cls.isdigit():
            continue
        for path in sorted(glob.glob(os.path.join(root, cls, '*.png'))):
            feats.append(to_digit_features(load_image(path)))
            labels.append(int(cls))
    if not feats:
        raise SystemExit(f'demo_score: no digit images in {root!r}; write them with scripts/make_digits.py')
    return np.stack(feats), np.array(labels)


def load_samples(root: str) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, int, str]]]:
    """(features, classes, [(class, seed, path)]) of every `class{c}_seed{s}.png` under root."""
    found = []
    for path in sorted(glob.glob(os.path.join(root, '**', 'class*_seed*.png'), recursive=True)):
        cs = parse_sample_name(os.path.basename(path))
        if cs is not None:
            found.append((cs[0], cs[1], path))
    if not found:
        raise SystemExit(f'demo_score: no generated images (class<c>_seed<s>.png) under {root!r}; run gen_img.py first')
    feats = np.stack([to_digit_features(load_image(p)) for _, _, p in found])
    return feats, np.array([c for c, _, _ in found]), found


# ----------------------------------------------------------------------------- scoring
def train_classifier(data_path: str, seed: int = 0):
    """Logistic regression on the real train digits; returns (classifier, accuracy on the real val digits)."""
    from sklearn.linear_model import LogisticRegression
    x_tr, y_tr = load_folder_features(os.path.join(data_path, 'train'))
    x_va, y_va = load_folder_features(os.path.join(data_path, 'val'))
    clf = LogisticRegression(max_iter=5000, random_state=seed)
    clf.fit(x_tr / DIGIT_MAX, y_tr)
    return clf, float((clf.predict(x_va / DIGIT_MAX) == y_va).mean())


def score_samples(clf, samples_dir: str) -> Dict[str, object]:
    """Class consistency of the samples under a folder, overall and per class."""
    feats, classes, found = load_samples(samples_dir)
    pred = clf.predict(feats / DIGIT_MAX)
    return dict(consistency=float((pred == classes).mean()), n=len(found),
                per_class=per_class_accuracy(pred, classes))


def tokenizer_mse(vae_ckpt: str, data_path: str) -> float:
    """Reconstruction MSE on [-1, 1] of the val images through the tokenizer file."""
    from utils.data.datasets import build_datasets
    from utils.train.tokenizer_trainer import load_tokenizer, recon_mse
    vae, arch = load_tokenizer(vae_ckpt)
    _, _, val_set = build_datasets(data_path, arch['reso'], arch['reso'])
    return recon_mse(vae, val_set)


def transformer_params(ckpt: str) -> int:
    """Trainable parameter count of the transformer in a checkpoint (slim export or training checkpoint)."""
    from utils.checkpoint import read_state_dict
    return count_params(read_state_dict(ckpt))


def comparison_grid(sample_dirs: Sequence[str], scale: int = 4, pad: int = 3, gap: int = 12, line: int = 110
                    ) -> np.ndarray:
    """uint8 image: for each samples folder a block (rows = classes, columns = seeds), side by side, upscaled.

    Tiles are separated by `pad` px of gray (`line`) so bright strokes of neighbouring digits do not merge;
    blocks by `gap` px of white.
    """
    from PIL import Image
    blocks = []
    for root in sample_dirs:
        _, _, found = load_samples(root)
        classes = sorted({c for c, _, _ in found})
        seeds = sorted({s for _, s, _ in found})
        where = {(c, s): p for c, s, p in found}
        first = load_image(found[0][2])
        h, w = first.shape[0] * scale, first.shape[1] * scale
        block = np.full((len(classes) * (h + pad) + pad, len(seeds) * (w + pad) + pad, 3), line, np.uint8)
        for i, c in enumerate(classes):
            for j, s in enumerate(seeds):
                if (c, s) in where:
                    img = np.asarray(Image.fromarray(load_image(where[(c, s)])).resize((w, h), Image.NEAREST))
                    y, x = pad + i * (h + pad), pad + j * (w + pad)
                    block[y:y + h, x:x + w] = img
        blocks.append(block)
    height = max(b.shape[0] for b in blocks)
    padded = [np.pad(b, ((0, height - b.shape[0]), (0, gap), (0, 0)), constant_values=255) for b in blocks]
    return np.concatenate(padded, axis=1)[:, :-gap]


def main(argv=None):
    """Compute the scores, write them as JSON (merged into an existing file's keys) and print them."""
    p = argparse.ArgumentParser(description='Score the digits demo (see docs/DEMO.md).')
    p.add_argument('--data_path', required=True, help='the image folder of make_digits.py (train/ and val/)')
    p.add_argument('--vae_ckpt', default='', help='tokenizer file for the reconstruction MSE')
    p.add_argument('--viar_ckpt', default='', help='VIAR checkpoint (for its parameter count)')
    p.add_argument('--viar_samples', default='', help='folder of VIAR samples from gen_img.py')
    p.add_argument('--var_ckpt', default='', help='VAR checkpoint (for its parameter count)')
    p.add_argument('--var_samples', default='', help='folder of VAR samples from gen_img.py')
    p.add_argument('--grid', default='', help='write an upscaled VIAR | VAR sample grid PNG here')
    p.add_argument('--started_at', type=float, default=None,
                   help='Unix time the run began; `seconds` = from then until the scores are written')
    p.add_argument('--cpu_times', default='', help="bash `times` line of the run's finished children (CPU seconds)")
    p.add_argument('--extra', default='{}', help='JSON object of further keys to record')
    p.add_argument('--out', default='demo_output/results.json')
    args = p.parse_args(argv)

    results = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    results.update(json.loads(args.extra))
    clf, results['classifier_acc_real'] = train_classifier(args.data_path)
    if args.vae_ckpt:
        results['recon_mse'] = tokenizer_mse(args.vae_ckpt, args.data_path)
    for name, ckpt, samples in (('viar', args.viar_ckpt, args.viar_samples), ('var', args.var_ckpt, args.var_samples)):
        if samples:
            s = score_samples(clf, samples)
            results[f'class_consistency_{name}'] = s['consistency']
            results[f'per_class_{name}'] = s['per_class']
            results[f'n_samples_{name}'] = s['n']
        if ckpt:
            results[f'params_{name}'] = transformer_params(ckpt)
    if args.grid:
        from PIL import Image
        dirs = [d for d in (args.viar_samples, args.var_samples) if d]
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        Image.fromarray(comparison_grid(dirs)).save(args.grid)
        results['grid'] = args.grid
    if args.started_at is not None:
        results['seconds'] = round(time.time() - args.started_at, 1)
    if args.cpu_times:
        results['cpu_seconds'] = round(parse_bash_times(args.cpu_times), 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=2, sort_keys=True)
    for k in sorted(results):
        if not k.startswith('per_class'):
            print(f'{k:>26}: {results[k]}')


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
