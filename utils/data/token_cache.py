"""Pre-tokenised training data: the token maps of every image stored once, read back without the VQVAE encoder.

Shapes: N images in a shard, W stored views per image (crops x flips), L tokens over all scales.
A cache folder (written by `scripts/extract_tokens.py`) holds, per split and shard k, `<split>-<k:05d>.tokens.npy`
(uint16 (N, W, L)) and `<split>-<k:05d>.labels.npy` (int64 (N,)), and `manifest.json`; nothing is pickled.
Training draws one view per image per epoch (`draw_view`); validation uses view 0. Format, views and the recipe
difference: docs/TRAINING.md, "Pre-tokenised training".
"""
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from models.layout import num_tokens, scale_begin_ends
from utils.checkpoint import CheckpointError, resolve_checkpoint, sha256_of
from utils.data.sampler import DistInfiniteBatchSampler
from utils.train.architecture import same_tokenizer

MANIFEST = 'manifest.json'
FORMAT = 'viar-token-cache-1'
SPLITS = ('train', 'val')


class TokenCacheError(SystemExit):
    """A cache that cannot be used as it is; the message names the file and what to do."""


# ---------------------------------------------------------------- pure pieces

def views_per_image(crops: int, hflip: bool) -> int:
    """W: stored views of every training image."""
    return crops * (2 if hflip else 1)


def view_parts(view: int, hflip: bool) -> Tuple[int, bool]:
    """(crop index, flipped) of stored view `view` (views are crop-major: crop c is views 2c, 2c+1 with hflip)."""
    return (view // 2, bool(view % 2)) if hflip else (view, False)


def draw_view(seed: int, epoch: int, index: int, n_views: int) -> int:
    """The view of image `index` trained in epoch `epoch`: a generator keyed by (seed, epoch, index)."""
    if n_views == 1:
        return 0
    g = np.random.default_rng([seed % (2 ** 63), epoch, index])
    return int(g.integers(n_views))


def crop_seed(seed: int, index: int, crop: int) -> int:
    """Seed of the random crop `crop` of image `index` (K > 1) when the cache is written."""
    return (seed * 1_000_003 + index) * 1_009 + crop


def shard_ranges(n_images: int, shard_size: int) -> List[Tuple[int, int]]:
    """[start, end) image ranges of the shards of a split."""
    return [(s, min(s + shard_size, n_images)) for s in range(0, n_images, shard_size)]


def shard_names(split: str, k: int) -> Tuple[str, str]:
    """(tokens file, labels file) of shard k of a split."""
    return f'{split}-{k:05d}.tokens.npy', f'{split}-{k:05d}.labels.npy'


def split_scales(tokens_BL: torch.Tensor, patch_nums: Sequence[int], prog_si: int = -1) -> List[torch.Tensor]:
    """(B, L) concatenated indices -> per-scale (B, pn * pn) long tensors (up to scale prog_si if >= 0), as
    `VQVAE.img_to_idxBl` returns them."""
    ranges = scale_begin_ends(patch_nums)[:prog_si + 1 if prog_si >= 0 else None]
    return [tokens_BL[:, bg:ed].long() for bg, ed in ranges]


def tokenize_images(vae, img_B3HW: torch.Tensor, prog_si: int = -1) -> List[torch.Tensor]:
    """Per-scale token indices (B, pn * pn) of images in [-1, 1] (up to scale prog_si if >= 0), cached or on the
    fly, always with TF32 off so both pick the same codes (docs/TRAINING.md, "TF32 and tokens")."""
    cuda = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = [b.fp32_precision for b in cuda]   # torch's new settings only: the legacy allow_tf32 state is untouched
    for b in cuda:
        b.fp32_precision = 'ieee'
    try:
        return vae.img_to_idxBl(img_B3HW, prog_si=prog_si)
    finally:
        for b, value in zip(cuda, saved):
            b.fp32_precision = value


def npy_complete(path: str, shape: Sequence[int], dtype) -> Optional[str]:
    """None when `path` is a complete .npy of this shape and dtype, else what is wrong with it."""
    if not os.path.isfile(path):
        return 'is missing'
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f)
            header = f.tell()
    except Exception as e:   # not an .npy, or a truncated header
        return f'is not a readable .npy file ({type(e).__name__})'
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype) or fortran:
        return f'holds {np.dtype(got_dtype)} {tuple(got_shape)}, the manifest says {np.dtype(dtype)} {tuple(shape)}'
    want = header + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != want:
        return f'is truncated ({size} of {want} bytes)'
    return None


# ---------------------------------------------------------------- the manifest

@dataclass
class CacheSettings:
    """What decides a cache's content; a rerun of the extractor with other settings is refused."""
    tokenizer_sha256: str
    V: int
    patch_nums: Tuple[int, ...]
    resolution: int
    mid_reso_px: int
    crops: int
    hflip: bool
    seed: int
    shard_size: int
    batch_size: int

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__, patch_nums=list(self.patch_nums))


def read_manifest(cache_dir: str) -> Dict[str, Any]:
    """The manifest of a cache folder; a missing or malformed one is a TokenCacheError."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isdir(cache_dir):
        raise TokenCacheError(f'--token_cache {cache_dir!r} is not a folder: write a cache with '
                              f'scripts/extract_tokens.py --data_path DATA --out {cache_dir} --vae_ckpt TOKENIZER.')
    if not os.path.isfile(path):
        raise TokenCacheError(f'{path} is missing: {cache_dir} is not a token cache (scripts/extract_tokens.py '
                              f'writes one).')
    try:
        with open(path) as f:
            man = json.load(f)
        if man.get('format') != FORMAT:
            raise ValueError(f"format {man.get('format')!r}, expected {FORMAT!r}")
        man['settings']['patch_nums'] = tuple(man['settings']['patch_nums'])
    except (ValueError, KeyError, TypeError) as e:
        raise TokenCacheError(f'{path} is not a valid token-cache manifest ({e}); write the cache again with '
                              f'scripts/extract_tokens.py.') from None
    return man


def check_shards(cache_dir: str, man: Dict[str, Any]):
    """Every shard the manifest lists is present and complete; else a TokenCacheError naming the file."""
    if man.get('status') != 'complete':
        raise TokenCacheError(f'{os.path.join(cache_dir, MANIFEST)}: the cache is incomplete (the extraction was '
                              f'stopped); run the same scripts/extract_tokens.py command again to finish it.')
    L = num_tokens(man['settings']['patch_nums'])
    for split in SPLITS:
        for k, sh in enumerate(man['splits'][split]['shards']):
            tok, lab = shard_names(split, k)
            for name, shape, dtype in ((tok, (sh['images'], sh['views'], L), np.uint16),
                                       (lab, (sh['images'],), np.int64)):
                problem = npy_complete(os.path.join(cache_dir, name), shape, dtype)
                if problem:
                    raise TokenCacheError(f'token cache shard {os.path.join(cache_dir, name)} {problem}: nothing was '
                                          f'trained. Run scripts/extract_tokens.py again with the same flags (it '
                                          f'remakes missing or damaged shards).')


def check_matches(man: Dict[str, Any], cache_dir: str, patch_nums: Sequence[int], resolution: int, V: int,
                  tokenizer_sha256: Optional[str]):
    """The cache was made for this run's pyramid, resolution, vocabulary and tokenizer; else a TokenCacheError."""
    s = man['settings']
    where = os.path.join(cache_dir, MANIFEST)
    if tuple(s['patch_nums']) != tuple(patch_nums):
        raise TokenCacheError(f'{where}: the cache holds the pyramid --pn {"_".join(map(str, s["patch_nums"]))}, this '
                              f'run trains --pn {"_".join(map(str, patch_nums))}: pass the same --pn or extract again.')
    if s['resolution'] != resolution:
        raise TokenCacheError(f'{where}: the cache was made at {s["resolution"]} px, this run trains {resolution} px.')
    if s['V'] != V:
        raise TokenCacheError(f'{where}: the cache was made by a tokenizer of vocabulary {s["V"]}, this run has --V {V}.')
    if tokenizer_sha256 is not None and s['tokenizer_sha256'] != tokenizer_sha256:
        raise TokenCacheError(f'{where}: the cache was made by another tokenizer (sha256 {s["tokenizer_sha256"][:12]}..., '
                              f'recorded path {man["tokenizer"].get("path")}) than --vae_ckpt (sha256 '
                              f'{tokenizer_sha256[:12]}...): pass that tokenizer, or extract the tokens again with this one.')


def open_cache(cache_dir: str) -> Dict[str, Any]:
    """read_manifest + check_shards: a cache that is safe to train on."""
    man = read_manifest(cache_dir)
    check_shards(cache_dir, man)
    return man


# ---------------------------------------------------------------- reading

class TokenShards(Dataset):
    """The images of one split as (tokens (L,) int64, label). Training items are (index, epoch): the view is
    `draw_view(seed, epoch, index)`; a plain index reads view 0 (validation)."""

    def __init__(self, cache_dir: str, man: Dict[str, Any], split: str, seed: int = 0):
        self.cache_dir, self.split, self.seed = cache_dir, split, seed
        shards = man['splits'][split]['shards']
        self.n_views = shards[0]['views'] if shards else 1
        self.starts = np.cumsum([0] + [sh['images'] for sh in shards])
        self._tokens: List[Optional[np.ndarray]] = [None] * len(shards)
        self._labels: List[Optional[np.ndarray]] = [None] * len(shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._tokens[k] is None:   # opened lazily, so each DataLoader worker maps its own
            tok, lab = shard_names(self.split, k)
            self._tokens[k] = np.load(os.path.join(self.cache_dir, tok), mmap_mode='r', allow_pickle=False)
            self._labels[k] = np.load(os.path.join(self.cache_dir, lab), allow_pickle=False)
        return self._tokens[k], self._labels[k]

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, epoch = item
            view = draw_view(self.seed, epoch, index, self.n_views)
        else:
            index, view = item, 0
        k = int(np.searchsorted(self.starts, index, side='right') - 1)
        tokens, labels = self._shard(k)
        i = index - int(self.starts[k])
        return torch.from_numpy(tokens[i, view].astype(np.int64)), int(labels[i])


class CacheBatchSampler(DistInfiniteBatchSampler):
    """The image sampler's order and positions (same resume rules); items are (index, epoch) so the dataset
    draws each image's view from (seed, epoch, index)."""

    def local_batch(self, epoch: int, it: int, perm: List[int]) -> List[Tuple[int, int]]:
        return [(idx, epoch) for idx, _ in super().local_batch(epoch, it, perm)]


def tokenizer_sha256(man: Dict[str, Any], cache_dir: str, tokenizer) -> Optional[str]:
    """sha256 of the tokenizer file a cached run loads (its quantizer builds the teacher-forcing input); None when
    the run's tokenizer is weights a checkpoint embeds that equal the recorded file's (checked here)."""
    recorded = man['tokenizer'].get('path')
    if tokenizer.random:
        raise TokenCacheError(f'--token_cache {cache_dir} needs the tokenizer that made it (recorded: {recorded}), '
                              f'not --vae_ckpt random: its quantizer turns the cached tokens into the teacher-forcing '
                              f'input.')
    if tokenizer.path:
        try:
            return sha256_of(resolve_checkpoint(tokenizer.path))
        except CheckpointError as e:
            raise TokenCacheError(str(e)) from None
    if not (recorded and same_tokenizer(recorded, tokenizer)):
        raise TokenCacheError(f'--token_cache {cache_dir} was made by the tokenizer {recorded}, which is not '
                              f'{tokenizer.where} (or is not here to compare): extract the tokens again with that '
                              f'tokenizer.')
    return None


def cache_datasets(cache_dir: str, seed: int, patch_nums: Sequence[int], resolution: int, V: int, tokenizer
                   ) -> Tuple[List[str], TokenShards, TokenShards]:
    """(class names, train set, val set) of a checked cache made for this pyramid, resolution, vocabulary and
    tokenizer; train.build_loaders samples them with CacheBatchSampler."""
    man = open_cache(cache_dir)
    check_matches(man, cache_dir, patch_nums, resolution, V, tokenizer_sha256(man, cache_dir, tokenizer))
    return list(man['classes']), TokenShards(cache_dir, man, 'train', seed), TokenShards(cache_dir, man, 'val', seed)
