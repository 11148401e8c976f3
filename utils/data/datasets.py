"""Class folders and the official augmentation (docs/TRAINING.md, "Data"): ImageNet's layout
(`<data_path>/train/<class>/*`, `<data_path>/val/<class>/*`), or one subfolder per class (`<data_path>/<class>/*`,
or train/ alone), whose validation images are then 5% of each class held out of training, the same on every run.

Bad input is a one-line DataError (a SystemExit). An undecodable image raises UnreadableImageError naming the
file when it is loaded: it is not skipped, since dropping samples would change the batch and the data order.
Each sample's augmentation runs under its own seed from the sampler, in a forked RNG, so crops and flips do not
depend on the number of workers or on where a run resumed.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import PIL.Image as PImage
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, transforms


HOLDOUT_FRACTION = 0.05   # of each class, for validation, when --data_path has no val/ folder


class DataError(SystemExit):
    """A data folder that cannot be used; the message says what to fix."""


class UnreadableImageError(RuntimeError):
    """An image file that PIL cannot decode."""


def pm1(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x.mul(2).sub_(1)


def build_transforms(final_reso: int, mid_reso_px: int, hflip: bool) -> Tuple[transforms.Compose, transforms.Compose]:
    """(train, val) transforms of the official recipe."""
    resize = transforms.Resize(mid_reso_px, interpolation=InterpolationMode.LANCZOS)
    train = [resize, transforms.RandomCrop((final_reso, final_reso)), transforms.ToTensor(), pm1]
    if hflip:
        train.insert(0, transforms.RandomHorizontalFlip())
    val = [resize, transforms.CenterCrop((final_reso, final_reso)), transforms.ToTensor(), pm1]
    return transforms.Compose(train), transforms.Compose(val)


def load_rgb(path: str) -> PImage.Image:
    """Decode an image as RGB; an undecodable file raises UnreadableImageError naming it."""
    try:
        with open(path, 'rb') as f:
            img = PImage.open(f)
            return img.convert('RGB')
    except Exception as e:
        raise UnreadableImageError(f'cannot read image {path} ({type(e).__name__}: {e}); '
                                   f'delete or replace the file and restart (training resumes).') from None


def scan_classes(root: str, split: str) -> List[str]:
    """Sorted class folder names of a split, after checking each exists and holds an image."""
    if not os.path.isdir(root):
        raise DataError(f'{split} folder {root} does not exist: --data_path must contain one subfolder of images per '
                        f'class (or train/ and val/ with one subfolder per class, the ImageNet layout).')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f'{root} has no class subfolders: put the images of each class in their own folder, '
                        f'e.g. {root}/n01440764/xxx.JPEG.')
    for c in classes:
        with os.scandir(os.path.join(root, c)) as it:
            if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in it):   # ImageFolder's rule
                raise DataError(f'class folder {os.path.join(root, c)} holds no image '
                                f'({", ".join(IMG_EXTENSIONS[:4])}...): add images or remove the folder.')
    return classes


class ClassFolder(ImageFolder):
    """torchvision ImageFolder with a fixed class list (val uses train's class indices)."""

    def __init__(self, root: str, classes: List[str], transform=None):
        self._fixed_classes = classes
        super().__init__(root, transform=transform, loader=load_rgb)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        """The classes present in this folder, indexed as in the fixed list."""
        idx = {c: i for i, c in enumerate(self._fixed_classes)}
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = [c for c in present if c not in idx]
        if unknown:
            raise DataError(f'{directory} has class folders missing from train/: {unknown[:5]}; '
                            f'val/ classes must be a subset of train/ classes.')
        return present, {c: idx[c] for c in present}


class SeededSamples(Dataset):
    """Items are (index, seed): the transform of sample `index` runs under `seed` in a forked RNG."""

    def __init__(self, base: ClassFolder):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.base[index]
        return self.base[item]


def data_roots(data_path: str) -> Tuple[str, Optional[str]]:
    """(train root, val root or None) of --data_path: `train/` and `val/` (ImageNet layout), `train/` alone, or the
    class folders themselves (a folder of images per class); None: the validation images are held out of train."""
    if not data_path or not os.path.isdir(data_path):
        raise DataError(f'--data_path {data_path!r} is not a folder: pass a folder with one subfolder of images per '
                        f'class (or ImageNet\'s layout, train/ and val/ inside).')
    train = os.path.join(data_path, 'train')
    if os.path.isdir(train):
        val = os.path.join(data_path, 'val')
        return train, val if os.path.isdir(val) else None
    return data_path, None


def held_out(targets: Sequence[int], fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> List[int]:
    """Indices of the validation images taken out of a training set without val/: in every class of n >= 2 images,
    max(1, round(fraction * n)) of them, the same on every run and every rank (a fixed seed, not the run's)."""
    g = torch.Generator().manual_seed(seed)
    out: List[int] = []
    for c in sorted(set(targets)):
        idx = [i for i, t in enumerate(targets) if t == c]
        if len(idx) >= 2:
            k = max(1, round(fraction * len(idx)))
            out += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    return sorted(out)


def keep_only(folder: ClassFolder, indices: Sequence[int]) -> ClassFolder:
    """The folder dataset restricted to these samples, in place."""
    folder.samples = [folder.samples[i] for i in indices]
    folder.imgs, folder.targets = folder.samples, [t for _, t in folder.samples]
    return folder


def build_datasets(data_path: str, final_reso: int, mid_reso_px: int, hflip: bool = False
                   ) -> Tuple[List[str], SeededSamples, ClassFolder]:
    """(class names: the folder names, train set yielding seeded samples, val set); clear errors on a bad folder.
    Without a val/ folder, HOLDOUT_FRACTION of each class's images are validation images instead (held_out)."""
    train_tf, val_tf = build_transforms(final_reso, mid_reso_px, hflip)
    train_root, val_root = data_roots(data_path)
    classes = scan_classes(train_root, 'train')
    train = ClassFolder(train_root, classes, transform=train_tf)
    if val_root is not None:
        scan_classes(val_root, 'val')
        return classes, SeededSamples(train), ClassFolder(val_root, classes, transform=val_tf)
    val_idx = held_out(train.targets)
    if not val_idx:
        raise DataError(f'{train_root} has no class with two images or more: without a val/ folder some training '
                        f'images are held out for validation; add images, or a val/ folder.')
    val = keep_only(ClassFolder(train_root, classes, transform=val_tf), val_idx)
    keep = sorted(set(range(len(train.samples))) - set(val_idx))
    return classes, SeededSamples(keep_only(train, keep)), val


def unreadable_message(err: BaseException) -> Optional[str]:
    """The one-line message of an UnreadableImageError, also when re-raised from a DataLoader worker."""
    text = str(err)
    for line in reversed(text.splitlines()):
        if 'cannot read image' in line:
            return line[line.index('cannot read image'):]
    return None
