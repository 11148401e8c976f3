"""Zero-shot editing (VAR's in-/out-painting, VIAR Fig. 7): keep an image's tokens outside a mask, sample inside.

At every scale, tokens whose cell touches the mask are sampled (optionally under another class); the others are
forced to the input image's own tokens, so the unmasked region is kept and conditions the regenerated one.

Shapes: B batch, H, W pixels, pn side of a scale's token map, l = pn * pn tokens of one scale.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from models import EditSpec
from utils.sample import image_io

Box = Tuple[float, float, float, float]
EDIT_MODES = ('inpaint', 'outpaint')


def mask_to_scale(mask_BHW: torch.Tensor, pn: int) -> torch.Tensor:
    """(B, pn * pn) bool: a token is regenerated when ANY pixel of its adaptive-pooling cell is masked, so the
    regenerated tokens cover the mask at every scale (the 1x1 scale whenever the mask is not empty)."""
    if mask_BHW.dim() != 3:
        raise ValueError(f'mask must be (B, H, W), got shape {tuple(mask_BHW.shape)}')
    pooled_B1nn = F.adaptive_max_pool2d(mask_BHW.float().unsqueeze(1), pn)
    return pooled_B1nn.flatten(1) > 0.5


def box_mask(B: int, H: int, W: int, box: Box, device=None) -> torch.Tensor:
    """(B, H, W) bool, True inside box = (x0, y0, x1, y1) given as fractions of the width / height."""
    x0, y0, x1, y1 = parse_box(box)
    c0, c1 = int(round(x0 * W)), int(round(x1 * W))
    r0, r1 = int(round(y0 * H)), int(round(y1 * H))
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=device)
    mask[:, r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True   # a non-empty box covers at least one pixel
    return mask


def parse_box(box: Union[str, Sequence[float]]) -> Box:
    """'x0,y0,x1,y1' or a 4-sequence of fractions in [0, 1] with x0 < x1, y0 < y1."""
    try:
        vals = [float(v) for v in (box.split(',') if isinstance(box, str) else box)]
    except ValueError:
        raise ValueError(f'box must be four fractions x0,y0,x1,y1 like 0.25,0.25,0.75,0.75, got {box!r}') from None
    if len(vals) != 4:
        raise ValueError(f'box must be four fractions x0,y0,x1,y1, got {len(vals)} values: {box!r}')
    x0, y0, x1, y1 = vals
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f'box fractions need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}')
    return x0, y0, x1, y1


def check_edit_mode(mode: str):
    """ValueError unless `mode` is one of EDIT_MODES."""
    if mode not in EDIT_MODES:
        raise ValueError(f'edit mode must be one of {EDIT_MODES}, got {mode!r}')


def mode_mask(mode: str, B: int, H: int, W: int, box: Box, device=None) -> torch.Tensor:
    """(B, H, W) bool, True = regenerate: 'inpaint' the box, 'outpaint' everything outside it."""
    check_edit_mode(mode)
    inside = box_mask(B, H, W, box, device)
    return inside if mode == 'inpaint' else ~inside


def load_edit_inputs(image_path: str, mask_paths: Sequence[str], box: str, mode: str, size: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 3, R, R) in [-1, 1], mask (1, R, R) bool, True = regenerate) at R = size: the box when given,
    else the union of the mask PNGs' white regions; 'outpaint' inverts either. A bad input is a ValueError."""
    img_13HW, wh = image_io.load_image(image_path, size)
    check_edit_mode(mode)
    if str(box or '').strip():
        return img_13HW, mode_mask(mode, 1, size, size, parse_box(str(box).strip()))
    if not mask_paths:
        raise ValueError('draw the region to regenerate on the image, or give a box x0,y0,x1,y1')
    mask_1HW = torch.zeros(1, size, size, dtype=torch.bool)
    for path in mask_paths:
        mask_1HW |= image_io.load_mask(path, size, wh)
    return img_13HW, ~mask_1HW if mode == 'outpaint' else mask_1HW


def make_edit_spec(vae, img_B3HW: torch.Tensor, mask_BHW: torch.Tensor,
                   patch_nums: Optional[Sequence[int]] = None) -> EditSpec:
    """EditSpec for `autoregressive_infer_cfg(edit=...)`: the image's token maps, keep = outside the mask."""
    if img_B3HW.dim() != 4 or img_B3HW.shape[1] != 3:
        raise ValueError(f'image must be (B, 3, H, W), got shape {tuple(img_B3HW.shape)}')
    if mask_BHW.shape != (img_B3HW.shape[0], *img_B3HW.shape[2:]):
        raise ValueError(f'mask shape {tuple(mask_BHW.shape)} does not match the image '
                         f'(B, H, W) = {(img_B3HW.shape[0], *img_B3HW.shape[2:])}')
    patch_nums = tuple(patch_nums or vae.quantize.v_patch_nums)
    with torch.no_grad():
        gt_idx_Bl: List[torch.Tensor] = vae.img_to_idxBl(img_B3HW, v_patch_nums=patch_nums)
    mask_BHW = mask_BHW.to(img_B3HW.device)
    keep_Bl = [~mask_to_scale(mask_BHW, pn) for pn in patch_nums]
    return EditSpec(gt_idx_Bl=gt_idx_Bl, keep_Bl=keep_Bl)


def prepare_edit(vae, img_13HW: torch.Tensor, mask_1HW: torch.Tensor, patch_nums: Sequence[int]
                 ) -> Tuple[EditSpec, Dict[str, torch.Tensor]]:
    """(EditSpec of one image and mask, the views shown beside the edits: {'input', 'mask', 'reconstruction'} as
    [0, 1] images (3, H, W) on the CPU; the reconstruction is what the kept tokens decode to)."""
    with torch.inference_mode():
        spec = make_edit_spec(vae, img_13HW, mask_1HW, patch_nums)
        recon_13HW = vae.idxBl_to_img(spec.gt_idx_Bl, same_shape=True, last_one=True)
    views = dict(input=img_13HW[0].add(1).mul(0.5), mask=mask_1HW[0].float().expand(3, -1, -1),
                 reconstruction=recon_13HW[0].float().add(1).mul(0.5))
    return spec, {k: v.cpu() for k, v in views.items()}


def expand_edit_spec(spec: EditSpec, B: int) -> EditSpec:
    """Repeat a one-image EditSpec for a batch of B samples (several seeds or classes)."""
    if spec.gt_idx_Bl[0].shape[0] == B:
        return spec
    if spec.gt_idx_Bl[0].shape[0] != 1:
        raise ValueError(f'can only expand a one-image EditSpec, this one has {spec.gt_idx_Bl[0].shape[0]}')
    return EditSpec(gt_idx_Bl=[t.expand(B, -1) for t in spec.gt_idx_Bl],
                    keep_Bl=[t.expand(B, -1) for t in spec.keep_Bl])

