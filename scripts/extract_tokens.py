"""Tokenise an image folder once, for `train.py --token_cache DIR` (training without the VQVAE encoder).

    python scripts/extract_tokens.py --data_path /data/imagenet --out /data/imagenet_tokens \
        --vae_ckpt ckpts/vae_ch160v4096z32.pth --pn 256 --hflip --crops 1
    torchrun --nproc_per_node=8 scripts/extract_tokens.py ...   # shards split over the ranks

Writes the format of utils/data/token_cache.py; views, resuming and refusals: docs/TRAINING.md, "Pre-tokenised
training".
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import CenterCrop, InterpolationMode, RandomCrop, Resize, ToTensor
from tqdm import tqdm

if __package__ in (None, ''):   # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dist  # noqa: E402
from models.config import state_dict_kind, vae_arch_from_state_dict  # noqa: E402
from models.layout import PYRAMIDS, num_tokens  # noqa: E402
from utils.arch_flags import parse_pn  # noqa: E402
from utils.atomic import atomic_path, write_json_atomic  # noqa: E402
from utils.checkpoint import (CheckpointError, extract_state_dict, load_vae_weights, read_checkpoint,  # noqa: E402
                              resolve_checkpoint, sha256_of)
from utils.cli import exits_on_write_error, flag, parse_dataclass  # noqa: E402
from utils.data import token_cache as tc  # noqa: E402
from utils.data.datasets import build_datasets, load_rgb, pm1  # noqa: E402
from utils.train.tokenizer_trainer import build_tokenizer  # noqa: E402


@dataclass
class ExtractArgs:
    """What to tokenise and how."""
    data_path: str = flag('', 'image folder with train/<class>/* and val/<class>/* (ImageNet layout)')
    out: str = flag('', 'cache folder to write (created; a rerun with the same flags resumes it)')
    vae_ckpt: str = flag('', 'tokenizer file (official name or a train_tokenizer.py vae.pth); its sha256 goes into '
                             'the manifest and train.py checks it')
    pn: Tuple[int, ...] = flag(PYRAMIDS[256], "token-map sides, '_'-separated, or 256/512/1024 (train.py's --pn)",
                               parse=parse_pn)
    mid_reso: float = flag(1.125, "resize the shorter side to mid_reso * resolution before cropping (train.py's)")
    crops: int = flag(1, 'crops stored per training image: 1 = the centre crop, K > 1 = K random crops')
    hflip: bool = flag(False, 'also store the horizontal flip of every crop')
    seed: int = flag(0, 'seed of the random crops (K > 1)')
    batch_size: int = flag(64, 'images per encoder call')
    shard_size: int = flag(10000, 'images per shard')
    workers: int = flag(0, 'image-decoding worker processes')
    device: str = flag('auto', 'auto, cuda or cpu')
    progress: bool = flag(True, 'progress bar (rank 0)')


def check_args(a: ExtractArgs):
    """Cheap checks before anything is loaded."""
    if not a.data_path:
        raise SystemExit('extract_tokens: --data_path is required (a folder with train/ and val/ class folders).')
    if not os.path.isdir(a.data_path):
        raise SystemExit(f'extract_tokens: --data_path {a.data_path!r} is not a folder: pass the dataset root with '
                         f'train/ and val/ class folders inside.')
    if not a.out:
        raise SystemExit('extract_tokens: --out is required (the cache folder to write).')
    if not a.vae_ckpt:
        raise SystemExit('extract_tokens: --vae_ckpt is required: the cache records the tokenizer it was made with '
                         '(e.g. ckpts/vae_ch160v4096z32.pth, or the vae.pth of train_tokenizer.py).')
    for name in ('crops', 'batch_size', 'shard_size'):
        if getattr(a, name) < 1:
            raise SystemExit(f'extract_tokens: --{name} must be >= 1, got {getattr(a, name)}.')


def load_tokenizer(path: str, patch_nums, device):
    """(VQVAE in eval mode, its sizes, sha256 of its file) from a tokenizer file; sizes from its weights."""
    resolved = resolve_checkpoint(path)
    sd = extract_state_dict(read_checkpoint(resolved), path)
    if state_dict_kind(sd) != 'vae':
        raise SystemExit(f'extract_tokens: {path} is not a VQVAE tokenizer file; pass the tokenizer as --vae_ckpt.')
    arch = vae_arch_from_state_dict(sd)
    if arch['V'] > 65536:
        raise SystemExit(f'extract_tokens: vocabulary {arch["V"]} does not fit uint16 token files (at most 65536).')
    vae = build_tokenizer(dict(arch, share_quant_resi=4, patch_nums=patch_nums), train=False)
    load_vae_weights(vae, sd, where=path)
    return vae.to(device).eval(), arch, sha256_of(resolved)


class Views:
    """The stored views of one image: resize, then the centre crop or seeded random crops, then optional flips."""

    def __init__(self, samples: List[Tuple[str, int]], resolution: int, mid_reso_px: int, crops: int, hflip: bool,
                 seed: int, split: str):
        self.samples, self.crops, self.hflip, self.seed, self.split = samples, crops, hflip, seed, split
        self.resize = Resize(mid_reso_px, interpolation=InterpolationMode.LANCZOS)
        self.center, self.random = CenterCrop((resolution, resolution)), RandomCrop((resolution, resolution))
        self.to_tensor = ToTensor()

    def n_views(self) -> int:
        return tc.views_per_image(self.crops, self.hflip) if self.split == 'train' else 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        """(views (W, 3, R, R) in [-1, 1], label) of image `index`."""
        path, label = self.samples[index]
        img = self.resize(load_rgb(path))
        out = []
        for v in range(self.n_views()):
            c, flip = tc.view_parts(v, self.hflip)
            if self.crops == 1 or self.split != 'train':
                crop = self.center(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(tc.crop_seed(self.seed, index, c))
                    crop = self.random(img)
            x = pm1(self.to_tensor(crop))
            out.append(x.flip(-1) if flip else x)
        return torch.stack(out), label


def start_manifest(out: str, settings: tc.CacheSettings, header: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest to fill: the one already in `out` when its settings are the same (a resume), else a new one;
    a cache of other settings is refused."""
    path = os.path.join(out, tc.MANIFEST)
    if not os.path.isfile(path):
        return dict(format=tc.FORMAT, status='incomplete', settings=settings.to_dict(), **header)
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError:
        raise SystemExit(f'extract_tokens: {path} is not valid JSON; delete {out} to start again.') from None
    was = old.get('settings', {})
    diff = [f'--{k} {was.get(k)} (now {v})' for k, v in settings.to_dict().items() if was.get(k) != v]
    if diff:
        raise SystemExit(f'extract_tokens: {out} holds a cache made with other settings: {", ".join(diff)}. '
                         f'Pass another --out, or delete it to start again.')
    return old


def encode_shard(vae, views: Views, start: int, end: int, batch_size: int, workers: int, device, bar=None):
    """(tokens uint16 (n, W, L), labels int64 (n,)) of images [start, end), batch_size images per encoder call."""
    loader = DataLoader(Subset(views, range(start, end)), batch_size=batch_size, num_workers=workers, shuffle=False)
    toks, labels = [], []
    with torch.inference_mode():
        for x_BW3HW, label_B in loader:
            B, W = x_BW3HW.shape[:2]
            per_view = []
            for v in range(W):   # one call per view at the batch size asked for (tokens do not depend on the mix)
                idx_Bl = tc.tokenize_images(vae, x_BW3HW[:, v].to(device, non_blocking=True))
                per_view.append(torch.cat(idx_Bl, dim=1).cpu())
            toks.append(torch.stack(per_view, dim=1).numpy().astype(np.uint16))
            labels.append(label_B.numpy().astype(np.int64))
            if bar is not None:
                bar.update(B)
    return np.concatenate(toks), np.concatenate(labels)


def write_npy(arr: np.ndarray, path: str):
    """np.save, atomically: a kill never leaves a half-written shard under its name."""
    with atomic_path(path, need=arr.nbytes) as tmp, open(tmp, 'wb') as f:
        np.save(f, arr, allow_pickle=False)


def run(a: ExtractArgs) -> str:
    """Write (or finish) the cache; returns the manifest path."""
    check_args(a)
    patch_nums = tuple(a.pn)
    device = dist.initialize(a.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        vae, arch, sha = load_tokenizer(a.vae_ckpt, patch_nums, device)
    except CheckpointError as e:
        raise SystemExit(f'extract_tokens: {e}') from None
    resolution = patch_nums[-1] * vae.downsample
    mid_px = round(a.mid_reso * resolution)
    L = num_tokens(patch_nums)
    _, train_set, val_set = build_datasets(a.data_path, resolution, mid_px)
    classes = list(train_set.base.classes)
    views = {split: Views(samples, resolution, mid_px, a.crops, a.hflip, a.seed, split)
             for split, samples in (('train', train_set.base.samples), ('val', val_set.samples))}
    settings = tc.CacheSettings(tokenizer_sha256=sha, V=arch['V'], patch_nums=patch_nums, resolution=resolution,
                                mid_reso_px=mid_px, crops=a.crops, hflip=a.hflip, seed=a.seed,
                                shard_size=a.shard_size, batch_size=a.batch_size)
    tok_path = os.path.abspath(a.vae_ckpt) if os.path.isfile(a.vae_ckpt) else a.vae_ckpt
    header = dict(tokenizer=dict(arch, path=tok_path, sha256=sha), data_path=os.path.abspath(a.data_path),
                  classes=classes, L=L)
    path = os.path.join(a.out, tc.MANIFEST)
    man = start_manifest(a.out, settings, header)
    if rank == 0:
        write_json_atomic(man, path)
    dist.barrier()
    work = []   # (split, shard index, start, end) of this rank's shards that are not finished
    for split in tc.SPLITS:
        for k, (s, e) in enumerate(tc.shard_ranges(len(views[split]), a.shard_size)):
            tok, lab = (os.path.join(a.out, n) for n in tc.shard_names(split, k))
            done = tc.npy_complete(tok, (e - s, views[split].n_views(), L), np.uint16) is None and \
                tc.npy_complete(lab, (e - s,), np.int64) is None
            if k % world == rank and not done:
                work.append((split, k, s, e))
    with tqdm(total=sum(e - s for _, _, s, e in work), unit='img', disable=not (a.progress and rank == 0),
              file=sys.stdout, desc=f'tokenising ({world} rank{"s" if world > 1 else ""})') as bar:
        for split, k, s, e in work:
            toks, labels = encode_shard(vae, views[split], s, e, a.batch_size, a.workers, device, bar)
            tok, lab = (os.path.join(a.out, n) for n in tc.shard_names(split, k))
            write_npy(labels, lab)
            write_npy(toks, tok)
    dist.barrier()
    if rank == 0:
        man['splits'] = {split: dict(images=len(v), views=v.n_views(), shards=[
            dict(images=e - s, views=v.n_views()) for s, e in tc.shard_ranges(len(v), a.shard_size)])
            for split, v in views.items()}
        man['status'] = 'complete'
        tc.check_shards(a.out, man)   # every shard of every rank is there and whole before the cache is declared done
        write_json_atomic(man, path)
        n = {s: man['splits'][s]['images'] for s in tc.SPLITS}
        print(f'[extract_tokens] {path}: {n["train"]} train x {man["splits"]["train"]["views"]} views, {n["val"]} val '
              f'images; {len(classes)} classes; pyramid {"_".join(map(str, patch_nums))} ({L} tokens), {resolution} px')
    dist.barrier()
    return path


@exits_on_write_error
def main(argv: Optional[List[str]] = None) -> str:
    """Parse flags and write the cache."""
    a = parse_dataclass(ExtractArgs, argv, 'Tokenise an image folder for train.py --token_cache.', 'extract')
    try:
        return run(a)
    finally:
        dist.finalize()


if __name__ == '__main__':
    main(sys.argv[1:])
