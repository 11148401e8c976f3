"""Write scikit-learn's 8x8 handwritten digits as an image folder: `out/{train,val}/<class>/<index>.png`.

    python scripts/make_digits.py --out demo_output/digits --size 16

Each digit (levels 0..16, ink = high) becomes an RGB image of `size` pixels by nearest-neighbour upscaling, so
box-averaging back to 8x8 (scripts/demo_score.py) recovers its levels. The split is stratified and fixed by
`--seed`: the same flags rewrite the same files.
"""
import argparse
import os
import shutil
import sys
from typing import Tuple

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGIT_SIDE = 8
DIGIT_MAX = 16.0  # sklearn digits hold integer levels 0..16


def digits_to_uint8(images_N88: np.ndarray, size: int) -> np.ndarray:
    """Digits (N, 8, 8) in 0..16 -> RGB uint8 (N, size, size, 3), nearest-neighbour upscaled."""
    if size % DIGIT_SIDE:
        raise ValueError(f'--size must be a multiple of {DIGIT_SIDE} (got {size}) so the upscaling is exact')
    rep = size // DIGIT_SIDE
    gray_N88 = np.clip(np.rint(images_N88 / DIGIT_MAX * 255), 0, 255).astype(np.uint8)
    big_Nss = gray_N88.repeat(rep, axis=1).repeat(rep, axis=2)
    return np.repeat(big_Nss[..., None], 3, axis=3)


def stratified_split(labels_N: np.ndarray, val_frac: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_frac` of every class goes to val, chosen by a seeded permutation."""
    if not 0 < val_frac < 1:
        raise ValueError(f'--val_frac must be in (0, 1), got {val_frac}')
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels_N):
        idx = rng.permutation(np.flatnonzero(labels_N == c))
        n_val = max(1, int(round(len(idx) * val_frac)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def make_digits(out: str, size: int = 16, val_frac: float = 0.2, seed: int = 0) -> Tuple[int, int]:
    """Write the train and val folders under `out` (replacing what is there); returns (n_train, n_val)."""
    digits = load_digits()
    images = digits_to_uint8(digits.images, size)
    splits = dict(zip(('train', 'val'), stratified_split(digits.target, val_frac, seed)))
    for split, indices in splits.items():
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)
        for i in indices:
            cls_dir = os.path.join(out, split, str(int(digits.target[i])))
            os.makedirs(cls_dir, exist_ok=True)
            Image.fromarray(images[i]).save(os.path.join(cls_dir, f'{int(i):04d}.png'))
    return len(splits['train']), len(splits['val'])


def main(argv=None):
    p = argparse.ArgumentParser(description='Write the sklearn digits as an ImageFolder (train/ and val/).')
    p.add_argument('--out', default='demo_output/digits', help='folder that receives train/ and val/')
    p.add_argument('--size', type=int, default=16, help='image side in pixels (a multiple of 8)')
    p.add_argument('--val_frac', type=float, default=0.2, help='fraction of each class held out for val/')
    p.add_argument('--seed', type=int, default=0, help='seed of the train/val split')
    args = p.parse_args(argv)
    try:
        n_train, n_val = make_digits(args.out, args.size, args.val_frac, args.seed)
    except ValueError as e:
        sys.exit(f'make_digits: {e}')
    print(f'[make_digits] {n_train} train + {n_val} val images of {args.size}x{args.size} px in {args.out}')


if __name__ == '__main__':
    main()
