"""Image files of the sampling scripts: writing PNGs and grids, loading images and masks for editing.

Generated images are (B, 3, H, W) in [0, 1]; loaded images (1, 3, R, R) in [-1, 1]; masks (1, R, R) bool, True =
regenerate. Images read here may come from anyone (the web app's uploads): oversized files and images are refused
before decoding, and Pillow's decompression-bomb check is an error.
"""
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import PIL.Image as PImage
import torch
import torchvision
from PIL import ImageDraw

from utils.atomic import atomic_path

MAX_IMAGE_BYTES = 20 * 2 ** 20   # 20 MiB: far above any photo the 256 px models need
MAX_IMAGE_SIDE = 4096            # pixels per side, checked on the header, before decoding
GRID_MIN_CELL = 64               # px: grids enlarge smaller images (the demo's 16 px digits 4x) so people can read them
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_TRAILER = b'\x00\x00\x00\x00IEND\xaeB`\x82'   # the empty IEND chunk every complete PNG ends with


class ImageInputError(ValueError):
    """An input image or mask that is missing, unreadable, too large or does not fit."""


def to_uint8_HWC(img_3HW: torch.Tensor) -> np.ndarray:
    """A [0, 1] image (3, H, W) as uint8 (H, W, 3), rounded to the nearest level."""
    return img_3HW.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def to_uint8_BHWC(img_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] images as uint8 (B, H, W, 3), truncating x * 255 as the official sampler does (FID samples)."""
    return img_B3HW.detach().float().clamp(0, 1).mul(255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def write_png(img_HW3: np.ndarray, path: str):
    """Write a uint8 (H, W, 3) image as PNG atomically; no fsync per image: a PNG lost in a crash is remade."""
    with atomic_path(path, durable=False, need=img_HW3.nbytes) as tmp:
        PImage.fromarray(img_HW3).save(tmp, format='PNG')


def save_png(img_3HW: torch.Tensor, path: str):
    """Write one [0, 1] image as PNG, rounded to the nearest level."""
    write_png(to_uint8_HWC(img_3HW), path)


def png_complete(path: str) -> bool:
    """True when `path` is a whole PNG: the signature at the start and the IEND chunk at the end."""
    try:
        with open(path, 'rb') as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_TRAILER):
                return False
            f.seek(-len(PNG_TRAILER), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_TRAILER
    except OSError:
        return False


def grid_scale(h: int, w: int, min_cell: int = GRID_MIN_CELL) -> int:
    """Whole-number factor that brings the shorter side to at least min_cell px: 16 px -> 4, 8 -> 8, 256 -> 1."""
    return max(1, -(-min_cell // max(1, min(h, w))))


def upscale_nearest(imgs_B3HW: torch.Tensor, scale: int) -> torch.Tensor:
    """Each pixel as a scale x scale block (nearest neighbour: no new colours, edges stay sharp)."""
    if scale == 1:
        return imgs_B3HW
    return imgs_B3HW.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def save_grid(imgs_B3HW: torch.Tensor, path: str, nrow: int, padding: int = 2, min_cell: int = GRID_MIN_CELL,
              row_labels: Optional[Sequence[str]] = None):
    """One PNG grid of [0, 1] images, small ones enlarged by `grid_scale`; row_labels in a white left margin."""
    scale = grid_scale(imgs_B3HW.shape[-2], imgs_B3HW.shape[-1], min_cell)
    grid_3HW = torchvision.utils.make_grid(upscale_nearest(imgs_B3HW.detach().float().cpu(), scale), nrow=max(1, nrow),
                                           padding=padding, pad_value=1.0)   # white padding
    if not row_labels:
        return save_png(grid_3HW, path)
    img = PImage.fromarray(to_uint8_HWC(grid_3HW))
    draw = ImageDraw.Draw(img)
    margin = max(draw.textbbox((0, 0), str(t))[2] for t in row_labels) + 2 * padding + 4
    out = PImage.new('RGB', (img.width + margin, img.height), 'white')
    out.paste(img, (margin, 0))
    draw, cell_h = ImageDraw.Draw(out), imgs_B3HW.shape[-2] * scale
    for r, text in enumerate(row_labels):
        top, bottom = draw.textbbox((0, 0), str(text))[1::2]
        y = padding + r * (cell_h + padding) + (cell_h - (bottom - top)) // 2 - top
        draw.text((padding + 2, y), str(text), fill='black')
    with_labels = torch.from_numpy(np.asarray(out)).permute(2, 0, 1).float().div(255)
    save_png(with_labels, path)


def limit_decoding():
    """Make Pillow itself refuse, on the header, images over MAX_IMAGE_SIDE**2 pixels (DecompressionBombError above
    twice MAX_IMAGE_PIXELS): for a server whose framework decodes uploads first (Gradio's image editor)."""
    PImage.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE ** 2 // 2


def _open(path: str, what: str) -> PImage.Image:
    """The decoded image, after the size limits: bytes first, then the header's width and height."""
    if not path or not os.path.isfile(path):
        raise ImageInputError(f'{what} {path!r} does not exist; pass the path of an image file (PNG, JPEG).')
    nbytes = os.path.getsize(path)
    if nbytes > MAX_IMAGE_BYTES:
        raise ImageInputError(f'{what} {path!r} is {nbytes / 2 ** 20:.1f} MiB; images up to '
                              f'{MAX_IMAGE_BYTES // 2 ** 20} MiB are read. Save it smaller (the model uses 256 px).')
    try:
        with warnings.catch_warnings():   # Pillow's decompression-bomb warning is an error here
            warnings.simplefilter('error', PImage.DecompressionBombWarning)
            img = PImage.open(path)       # reads the header only
            w, h = img.size
            if max(w, h) > MAX_IMAGE_SIDE:
                raise ImageInputError(f'{what} {path!r} is {w}x{h} pixels; images up to {MAX_IMAGE_SIDE}x'
                                      f'{MAX_IMAGE_SIDE} are read. Resize it (the model uses 256 px).')
            img.load()
        return img
    except ImageInputError:
        raise
    except (PImage.DecompressionBombError, PImage.DecompressionBombWarning) as e:
        raise ImageInputError(f'{what} {path!r} decodes to too many pixels ({e}); it was not read.') from None
    except Exception as e:
        raise ImageInputError(f'{what} {path!r} cannot be read as an image ({type(e).__name__}: {e}).') from None


def square_crop_resize(img: PImage.Image, size: int, resample) -> PImage.Image:
    """Centre-crop to the largest square, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), resample=resample)


def pil_to_tensor_pm1(img: PImage.Image) -> torch.Tensor:
    """An RGB PIL image as (1, 3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert('RGB'), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_image(path: str, size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(image (1, 3, size, size) in [-1, 1], original (width, height)): centre square crop, bicubic resize."""
    img = _open(path, 'image')
    return pil_to_tensor_pm1(square_crop_resize(img.convert('RGB'), size, PImage.BICUBIC)), img.size


def load_mask(path: str, size: int, image_wh: Tuple[int, int]) -> torch.Tensor:
    """(1, size, size) bool, True where the mask PNG (the image's size) is white; cropped and resized like it."""
    mask = _open(path, 'mask')
    if mask.size != tuple(image_wh):
        raise ImageInputError(f'mask {path!r} is {mask.size[0]}x{mask.size[1]} but the image is '
                              f'{image_wh[0]}x{image_wh[1]}; draw the mask at the image size (white = regenerate).')
    grey = np.asarray(square_crop_resize(mask.convert('L'), size, PImage.NEAREST))
    return torch.from_numpy(grey > 127).unsqueeze(0)

