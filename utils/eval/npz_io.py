"""Image batches as `.npz` files (arr_0, uint8 NHWC): validated readers of `.npz`, `.npy` or a PNG folder, and the
writer that packs sampling.py's PNGs. None holds the whole array: a 50K-image batch streams in bounded memory.
"""
import contextlib
import os
import queue
import re
import sys
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.atomic import atomic_path

ARRAY_KEY = 'arr_0'
STATS_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')
_NPY_MAGIC = b'\x93NUMPY'
_ZIP_MAGIC = b'PK\x03\x04'


class EvalInputError(Exception):
    """An input the evaluator cannot use; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ImageSource:
    """A validated set of images: where they are, how many, their size and stored dtype."""
    path: str
    kind: str                   # 'npz', 'npy' or 'png_dir'
    shape: Tuple[int, ...]      # (N, H, W, 3); H, W of the first image for PNG folders
    dtype: np.dtype
    files: Tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Number of images."""
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields uint8 (b, H, W, 3) batches in stored order, checking values as they stream."""
        if self.kind == 'png_dir':
            yield from _png_batches(self, batch_size)
        else:
            yield from _array_batches(self, batch_size)


# ----------------------------------------------------------------------------- opening / validation

def open_image_source(path: str) -> ImageSource:
    """Opens an image batch (.npz with arr_0, .npy, or a PNG folder) and validates its header."""
    if not os.path.exists(path):
        raise EvalInputError(f'{path}: no such file or folder')
    if os.path.isdir(path):
        return _open_png_dir(path)
    with open(path, 'rb') as f:
        magic = f.read(6)
        f.seek(0)
        if magic == _NPY_MAGIC:
            return _validated(path, 'npy', *_read_npy_header(f, path))
    if not magic.startswith(_ZIP_MAGIC[:2]):
        raise EvalInputError(f'{path}: not an .npz (zip) or .npy file; save images with '
                             f'np.savez(path, arr_0=images_uint8_NHWC)')
    with _open_member(path) as member:
        return _validated(path, 'npz', *_read_npy_header(member, path))


def _validated(path, kind, shape, fortran, dtype) -> ImageSource:
    """Checks that a stored array header describes NHWC RGB images of integers."""
    dtype = np.dtype(dtype)
    if dtype.kind == 'f':
        raise EvalInputError(f'{path}: {ARRAY_KEY} is {dtype} but must be uint8 in 0..255; convert with '
                             f'np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for images in [0, 1]')
    if dtype.kind not in 'ui':
        raise EvalInputError(f'{path}: {ARRAY_KEY} has dtype {dtype}; it must be uint8 images in 0..255')
    if len(shape) != 4 or shape[3] != 3:
        hint = ' (it looks like NCHW: transpose with x.transpose(0, 2, 3, 1))' \
            if len(shape) == 4 and shape[1] == 3 else ''
        raise EvalInputError(f'{path}: {ARRAY_KEY} has shape {tuple(shape)}, expected NHWC with 3 '
                             f'channels (N, H, W, 3){hint}')
    if fortran and shape[0] > 1:
        raise EvalInputError(f'{path}: {ARRAY_KEY} is stored in Fortran order and cannot be streamed; '
                             f'save np.ascontiguousarray(images) instead')
    return ImageSource(path, kind, tuple(int(s) for s in shape), dtype)


@contextlib.contextmanager
def _open_member(path: str):
    """The arr_0.npy member of an npz, open for streaming, with clear errors for broken files."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EvalInputError(f'{path}: cannot read it as .npz ({e}); the file is corrupt or truncated, '
                             f'recreate it') from None
    with zf:
        names = zf.namelist()
        if ARRAY_KEY + '.npy' not in names:
            found = ', '.join(n[:-4] if n.endswith('.npy') else n for n in names) or 'nothing'
            raise EvalInputError(f'{path}: no {ARRAY_KEY!r} array (found: {found}); save images with '
                                 f'np.savez(path, arr_0=images)')
        with zf.open(ARRAY_KEY + '.npy') as member:
            yield member


def _read_npy_header(f, path: str):
    """Parses an .npy header from a stream: (shape, fortran_order, dtype)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise EvalInputError(f'{path}: {ARRAY_KEY} is corrupt ({e}); recreate the file') from None
    except (ValueError, EOFError) as e:
        raise EvalInputError(f'{path}: {ARRAY_KEY} has a broken .npy header ({e}); recreate the file') from None
    raise EvalInputError(f'{path}: unsupported .npy format version {version}; save it again with numpy')


def read_precomputed_stats(path: str) -> Optional[dict]:
    """The (mu, sigma, mu_s, sigma_s) arrays stored beside arr_0 in an .npz, or None if absent."""
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return None
    with np.load(path) as npz:
        if not all(k in npz.files for k in STATS_KEYS):
            return None
        return {k: np.asarray(npz[k]) for k in STATS_KEYS}


# ----------------------------------------------------------------------------- array streaming

def _read_exact(f, size: int, path: str, done: int, total: int) -> bytes:
    """Exactly size bytes (reads return short only at the end), or an error saying the array is truncated."""
    try:
        data = f.read(size)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise EvalInputError(f'{path}: {ARRAY_KEY} is corrupt ({e}); recreate the file') from None
    if len(data) < size:
        raise EvalInputError(f'{path}: {ARRAY_KEY} is truncated: expected {total} bytes of image data, '
                             f'the file ends after {done + len(data)}; recreate the file')
    return data


def check_pixel_range(batch: np.ndarray, path: str) -> np.ndarray:
    """Returns the batch as uint8, or explains which values fall outside 0..255."""
    if batch.dtype == np.uint8:
        return batch
    lo, hi = int(batch.min()), int(batch.max())
    if lo < 0 or hi > 255:
        raise EvalInputError(f'{path}: pixel values must lie in 0..255, found values from {lo} to {hi}; '
                             f'clip and convert to uint8')
    return batch.astype(np.uint8)


def _array_batches(src: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    """Streams an .npy / npz arr_0 batch by batch."""
    per_image = int(np.prod(src.shape[1:])) * src.dtype.itemsize
    total = per_image * src.count
    with (_open_member(src.path) if src.kind == 'npz' else open(src.path, 'rb')) as f:
        _read_npy_header(f, src.path)
        done = 0
        for start in range(0, src.count, batch_size):
            b = min(batch_size, src.count - start)
            data = _read_exact(f, b * per_image, src.path, done, total)
            done += len(data)
            batch = np.frombuffer(data, src.dtype).reshape((b,) + src.shape[1:])
            yield check_pixel_range(batch, src.path)
        if src.kind == 'npz':
            try:
                f.read(1)                 # make sure zipfile reached the end and checked the CRC
            except (zipfile.BadZipFile, zlib.error) as e:
                raise EvalInputError(f'{src.path}: {ARRAY_KEY} is corrupt ({e}); recreate the file') from None


# ----------------------------------------------------------------------------- PNG folders

def _natural_key(name: str):
    """Sort key that orders 'img2.png' before 'img10.png'."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _open_png_dir(path: str) -> ImageSource:
    """Lists and checks a folder of PNG images (sizes must agree; RGB only)."""
    files = sorted((f for f in os.listdir(path) if f.lower().endswith('.png')), key=_natural_key)
    if not files:
        raise EvalInputError(f'{path}: folder holds no .png images')
    first = load_png(os.path.join(path, files[0]))
    return ImageSource(path, 'png_dir', (len(files),) + first.shape, np.dtype(np.uint8), tuple(files))


def load_png(file: str) -> np.ndarray:
    """Decodes one PNG into uint8 (H, W, 3)."""
    try:
        with Image.open(file) as im:
            if im.mode != 'RGB':
                raise EvalInputError(f'{file}: image mode is {im.mode}, expected RGB; '
                                     f'save with img.convert("RGB")')
            return np.asarray(im, dtype=np.uint8)
    except EvalInputError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise EvalInputError(f'{file}: cannot decode PNG ({e}); the file is corrupt') from None


def _png_batches(src: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    """Decodes PNG batches with a few threads (PIL releases the GIL while decoding)."""
    size = src.shape[1:]
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, src.count, batch_size):
            names = src.files[start:start + batch_size]
            images: List[np.ndarray] = list(pool.map(load_png, [os.path.join(src.path, n) for n in names]))
            for name, im in zip(names, images):
                if im.shape != size:
                    raise EvalInputError(f'{os.path.join(src.path, name)}: size {im.shape} differs from '
                                         f'{size} of the first image; all images must share one size')
            yield np.stack(images)


# ----------------------------------------------------------------------------- writing

def pack_npz(paths: Sequence[str], npz_path: str, read: Optional[Callable[[str], np.ndarray]] = None,
             progress: bool = True) -> Tuple[int, ...]:
    """Stream PNGs into `npz_path` (an uncompressed np.savez file, arr_0 uint8 (N, H, W, 3)) atomically: the .npy
    header first, then each image's bytes, so memory stays at one image. read: the PNG decoder. Returns the shape."""
    read = read or load_png
    first = read(paths[0])
    shape = (len(paths),) + first.shape
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False, 'shape': shape}
    with atomic_path(npz_path, need=int(np.prod(shape))) as tmp, \
            zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
            zf.open(ARRAY_KEY + '.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i, path in enumerate(tqdm(paths, desc='packing .npz', unit='img', disable=not progress, file=sys.stdout)):
            img = first if i == 0 else read(path)
            if img.shape != first.shape:
                raise EvalInputError(f'{path} is {img.shape} but {paths[0]} is {first.shape}: one batch mixes sizes')
            f.write(img.tobytes())
    return shape


# ----------------------------------------------------------------------------- prefetching

def prefetch(batches: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Runs a batch iterator in a background thread, depth batches ahead; re-raises its errors."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def worker():
        """Produces batches into the queue; errors travel to the consumer."""
        try:
            for item in batches:
                if stop.is_set():
                    return
                q.put(item)
            q.put(end)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)
        finally:
            if hasattr(batches, 'close'):
                batches.close()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
