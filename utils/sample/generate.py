"""Images by (class, seed) for gen_img.py and the web app: each has its own generator seeded by its seed (as the
official gen_img.py), so it never depends on the batch it was drawn in."""
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from utils.sample.editing import expand_edit_spec


def check_classes(classes: Sequence[int], num_classes: int, flag: str = '--class_label'):
    """Every class id must index the model's class embedding."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f'error: {flag} {bad} out of range: this model has {num_classes} classes '
                         f'(0..{num_classes - 1}).')


def class_ids(labels: Sequence[str], names: Optional[Sequence[str]], num_classes: int,
              flag: str = '--class_label') -> List[int]:
    """Class ids for --class_label values: an id as it is, a name by its index in the names the export records."""
    ids = []
    for label in labels:
        text = str(label)
        if names and text in names:
            ids.append(list(names).index(text))
        elif text.lstrip('-').isdigit():
            ids.append(int(text))
        else:
            known = (f'its classes are named {", ".join(names[:20])}' + (', ...' if len(names) > 20 else '')
                     if names else 'it records no class names: pass ids')
            raise SystemExit(f'error: {flag} {text!r} is not a class of this model ({num_classes} classes); {known}.')
    check_classes(ids, num_classes, flag)
    return ids


def image_list(classes: Sequence[int], seeds: Sequence[int]) -> List[Tuple[int, int]]:
    """(class, seed) of every image, class-major: a grid's rows are classes, its columns seeds."""
    return [(c, s) for c in classes for s in seeds]


def chunks(items: Sequence, size: int) -> List[Sequence]:
    """Consecutive slices of at most `size` items."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def sample_batch(sampler, pairs: Sequence[Tuple[int, int]], sample_kw: dict, edit=None):
    """(images (B, 3, H, W) in [0, 1], SampleStats) of (class, seed) pairs; B = 1 is exactly the official call."""
    label_B = torch.tensor([c for c, _ in pairs], device=sampler.device)
    seeds = [s for _, s in pairs]
    if edit is not None:
        edit = expand_edit_spec(edit, len(pairs))
    return sampler(len(pairs), label_B, g_seed=seeds[0] if len(seeds) == 1 else seeds, edit=edit, return_stats=True,
                   **sample_kw)


def generate(sampler, pairs: Sequence[Tuple[int, int]], batch_size: int, sample_kw: dict, edit=None,
             progress: bool = True, on_batch: Optional[Callable[[int], None]] = None):
    """(images (N, 3, H, W) on the CPU in pair order, each batch's SampleStats); on_batch(images done so far)."""
    imgs, stats, done = [], [], 0
    with tqdm(total=len(pairs), unit='img', disable=not progress, file=sys.stdout) as bar:
        for batch in chunks(list(pairs), batch_size):
            img_B3HW, st = sample_batch(sampler, batch, sample_kw, edit)
            imgs.append(img_B3HW.float().cpu())
            stats.append(st)
            done += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(done)
    return torch.cat(imgs), stats


def mean_iters(stats) -> List[float]:
    """Implicit iterations each scale ran, averaged over the batches (they differ only when adaptive); [] for VAR."""
    runs = [s.iters for s in stats if s.iters]
    return [sum(col) / len(col) for col in zip(*runs)] if runs else []
