"""Generate class-conditional images with VAR / VIAR, or edit an image zero-shot (in- / out-painting).

    python gen_img.py --use_implicit True --class_label 970 88 --seeds 10 11 12 13 --iter_left 20 --iter_right 5
    python gen_img.py --var_ckpt var_d16.pth --depth 16 --edit_image cat.png --edit_box 0.3,0.3,0.7,0.7 --edit_class 207

An image depends only on its (class, seed). Writes `class{c}_seed{s}.png`, a grid and `.model.json` into
`output_dir/<checkpoint name>/`; a folder another model wrote is refused. See docs/GENERATION.md.
"""
import argparse
import json
import os
import time
from typing import List, Optional, Sequence

import torch

from models.config import ModelSpec
from models.solver import SolverSpec
from utils import cli
from utils.arch_flags import describe_model, describe_spec
from utils.atomic import write_json_atomic
from utils.logging_util import get_logger
from utils.model_io import DEFAULT_VAE_CKPT, load_sampler
from utils.sample import image_io
from utils.sample.compile_util import resolve_dtype, sampling_tf32
from utils.sample.config import add_model_source_args, add_sample_args, parse, resolve_device
from utils.sample.editing import EDIT_MODES, load_edit_inputs, parse_box, prepare_edit
from utils.sample.generate import class_ids, generate, image_list, mean_iters
from utils.sample.schedule_flags import schedule_note

log = get_logger('gen_img')
MODEL_RECORD = '.model.json'   # in each output folder: the model whose images it holds


def build_parser() -> argparse.ArgumentParser:
    """The official gen_img.py flags plus several classes, batching, schedules, editing and tiny random models."""
    p = argparse.ArgumentParser(
        description='VAR / VIAR image generation and zero-shot editing',
        epilog="Checkpoints: without --var_ckpt the official file is used (ckpts/viar.pth with --use_implicit, "
               "else ckpts/var_d{depth}.pth; downloaded when missing); '--var_ckpt random' skips loading (size "
               "flags describe the model). A checkpoint sets the architecture itself (typed model flags that "
               "disagree are reported). Without --vae_ckpt: the tokenizer a slim export embeds or records, else "
               f"{DEFAULT_VAE_CKPT} (downloaded when missing); with random weights, a random tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_source_args(p, defaults=dict(depth=30))
    add_sample_args(p)
    g = p.add_argument_group('generation')
    g.add_argument('--class_label', type=str, nargs='+', default=['970'],
                   help='one or more classes: ids, or the names a trained export records (its class folders)')
    g.add_argument('--seeds', type=int, nargs='+', default=list(range(10, 20)), help='one image per seed and class')
    g.add_argument('--batch_size', type=int, default=1,
                   help='images per forward pass; does not change the images (each has its own seeded generator)')
    o = p.add_argument_group('output')
    o.add_argument('--output_dir', type=str, default='gen_images')
    cli.add_bool_arg(o, '--save_grid', True, 'also write one grid PNG (rows = classes, columns = seeds)')
    o.add_argument('--nrow', type=int, default=4, help='grid images per row when there is one class')
    cli.add_bool_arg(o, '--progress', True, 'tqdm progress bar')
    e = p.add_argument_group('zero-shot editing (tokens outside the mask are kept at every scale)')
    e.add_argument('--edit_image', type=str, default='', help='image to edit; switches to editing')
    e.add_argument('--edit_mask', type=str, default='', help='PNG of the image size, white = regenerate')
    e.add_argument('--edit_box', type=str, default='', help='x0,y0,x1,y1 as fractions of width / height')
    e.add_argument('--edit_mode', type=str, default='inpaint', choices=EDIT_MODES,
                   help='with --edit_box: regenerate the box (inpaint) or everything outside it (outpaint)')
    e.add_argument('--edit_class', type=str, default=None,
                   help='class to regenerate under, an id or a recorded name (default --class_label)')
    return p


def describe_stats(stats, batch_size: int, cfg: float) -> List[str]:
    """Report lines: implicit iterations per scale (mean over batches when adaptive) and the KV-cache size."""
    lines = []
    mean = mean_iters(stats)
    if mean:
        text = ','.join(f'{m:g}' for m in mean)
        lines.append(f'implicit iterations per scale: {text} (total {sum(mean):g}; calls of the implicit block, as '
                     f'scripts/convergence.py counts them)')
    kv = max(s.kv_cache_bytes for s in stats)
    rows = 'cond + uncond rows' if cfg != 0 else 'conditional rows only: cfg 0'
    lines.append(f'KV cache: {kv / 2 ** 20:.2f} MiB for a batch of {batch_size} ({rows})')
    return lines


def seeds_tag(seeds: Sequence[int]) -> str:
    """Short file-name tag for a seed list (the official naming): first four, then _etc{n}."""
    return '_'.join(map(str, seeds[:4])) + (f'_etc{len(seeds)}' if len(seeds) > 4 else '')


def write_images(imgs_N3HW: torch.Tensor, pairs, classes, seeds, out_dir: str, prefix: str, save_grid: bool,
                 nrow: int, class_names: Optional[Sequence[str]] = None) -> List[str]:
    """Paths of one PNG per (class, seed) and, for several images, a grid labelled with any recorded class names."""
    paths = []
    for img_3HW, (c, s) in zip(imgs_N3HW, pairs):
        paths.append(os.path.join(out_dir, f'{prefix}class{c}_seed{s}.png'))
        image_io.save_png(img_3HW, paths[-1])
    if save_grid and len(pairs) > 1:
        cls_tag = f'class{classes[0]}' if len(classes) == 1 else 'classes' + '_'.join(map(str, classes))
        paths.append(os.path.join(out_dir, f'{prefix}{cls_tag}_seeds{seeds_tag(seeds)}_grid.png'))
        cols = len(seeds) if len(classes) > 1 else min(nrow, len(pairs))
        rows = -(-len(pairs) // cols)
        labels = None
        if class_names:   # rows are classes; one class wraps its seeds over several rows
            labels = [class_names[c] for c in classes] if len(classes) > 1 else [class_names[classes[0]]] * rows
        image_io.save_grid(imgs_N3HW, paths[-1], nrow=cols, row_labels=labels)
    return paths


def model_record(var_ckpt: str, ema: bool, spec) -> dict:
    """What identifies the model whose images a folder holds: checkpoint, EMA or not, architecture (JSON-exact)."""
    path = os.path.abspath(var_ckpt) if os.path.isfile(var_ckpt) else var_ckpt
    return json.loads(json.dumps(dict(checkpoint=path, ema=bool(ema), model=spec.to_dict())))


def same_model(a: dict, b: dict) -> bool:
    """Whether two records name one model; a .pth export and its .safetensors twin are one model."""
    def key(r: dict) -> tuple:
        return os.path.splitext(str(r.get('checkpoint')))[0], r.get('ema'), r.get('model')
    return key(a) == key(b)


def record_text(r: dict) -> str:
    """'/runs/viar/viar-slim.pth (a VIAR (depth 6, ...), EMA weights)'."""
    ema = ', EMA weights' if r.get('ema') else ''
    return f"{r.get('checkpoint')} ({describe_spec(ModelSpec.from_dict(r.get('model') or {}))}{ema})"


def claim_output_dir(out_dir: str, record: dict):
    """Refuse a folder whose images another model made (two checkpoints with one file name share a folder); else
    write the record, which also proves early that the folder is writable."""
    path = os.path.join(out_dir, MODEL_RECORD)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):   # no readable record: a new folder, or one without a record
        old = None
    if isinstance(old, dict) and not same_model(old, record):
        raise SystemExit(f'error: {out_dir} holds the images of {record_text(old)}; this run samples '
                         f'{record_text(record)} and would replace them. Pass another --output_dir, or remove '
                         f'{out_dir} first.')
    write_json_atomic(record, path)


def check_edit_args(args: argparse.Namespace):
    """Cheap checks of the editing flags before any model is loaded."""
    if bool(args.edit_mask) == bool(args.edit_box):
        raise SystemExit('error: editing needs exactly one of --edit_mask PNG (white = regenerate) or '
                         '--edit_box x0,y0,x1,y1.')
    for flag, path in (('--edit_image', args.edit_image), ('--edit_mask', args.edit_mask)):
        if path and not os.path.isfile(path):
            raise SystemExit(f'error: {flag} {path!r} does not exist; pass the path of an image file (PNG, JPEG).')
    if args.edit_box:
        try:
            parse_box(args.edit_box)
        except ValueError as e:
            raise SystemExit(f'error: --edit_box: {e}') from None


def start_edit(args: argparse.Namespace, vae, var, device, out_dir: str):
    """(EditSpec of --edit_image under --edit_mask / --edit_box, paths): writes edit_input.png, edit_mask.png and
    edit_recon.png."""
    mask_paths = [args.edit_mask] if args.edit_mask else []
    mode = args.edit_mode if args.edit_box else 'inpaint'   # --edit_mode applies to --edit_box only
    try:
        img_13HW, mask_1HW = load_edit_inputs(args.edit_image, mask_paths, args.edit_box, mode,
                                              var.patch_nums[-1] * vae.downsample)
    except ValueError as e:   # ImageInputError, a bad box
        raise SystemExit(f'error: {e}') from None
    if not mask_1HW.any():
        raise SystemExit('error: the edit mask is empty (nothing to regenerate); white marks the region to redraw.')
    edit, views = prepare_edit(vae, img_13HW.to(device), mask_1HW.to(device), var.patch_nums)
    paths = []
    for key, name in (('input', 'edit_input.png'), ('mask', 'edit_mask.png'), ('reconstruction', 'edit_recon.png')):
        paths.append(os.path.join(out_dir, name))
        image_io.save_png(views[key], paths[-1])
    log.info(f'editing {args.edit_image}: {int(mask_1HW.sum())} of {mask_1HW.numel()} pixels regenerated')
    return edit, paths


def banner(var, classes: Sequence[int], seeds: Sequence[int], sample, device, schedule_note: str) -> str:
    """What this run does: the model, the images asked for, the schedule, device and precision."""
    return (f'{describe_model(var)}; {len(classes)} class{"es" if len(classes) > 1 else ""} x {len(seeds)} '
            f'seed{"s" if len(seeds) > 1 else ""} = {len(classes) * len(seeds)} images; cfg {sample.cfg:g}, '
            f'top-k {sample.top_k}, top-p {sample.top_p:g}; {schedule_note}'
            + (f' (solver {sample.solver_spec()})' if sample.solver_spec() != SolverSpec() else '')
            + f'; device {device}, {resolve_dtype(torch.device(device).type, sample.dtype, sample.fast)}'
            + (', fast' if sample.fast else '') + (', compiled' if sample.compile else ''))


@cli.exits_on_write_error
def main(argv: Optional[Sequence[str]] = None):
    args, source, sample = parse(build_parser(), argv)
    if args.batch_size < 1:
        raise SystemExit('error: --batch_size must be >= 1.')
    if args.edit_image:
        check_edit_args(args)
        if sample.more_smooth:
            raise SystemExit('error: --more_smooth does not apply to editing (edited tokens are drawn as sampled '
                             'ones); drop it.')
    device = resolve_device(source.device)
    loaded, sampler, sample = load_sampler(source, sample, device, log=log.warning, info=log.info)
    vae, var = loaded.vae, loaded.var
    # CUDA's settings (nothing on a CPU): --dtype fp32 is full precision, so TF32 only with 16-bit autocast
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = sampling_tf32(sampler.dtype)
    if args.edit_image and args.edit_class is not None:
        classes = class_ids([args.edit_class], loaded.class_names, var.num_classes, '--edit_class')
    else:
        classes = class_ids(args.class_label, loaded.class_names, var.num_classes)
    out_dir = os.path.join(args.output_dir, loaded.tag)
    claim_output_dir(out_dir, model_record(loaded.ckpt, source.ema, loaded.spec))
    sample_kw = sample.call_kwargs(len(var.patch_nums))
    log.info(banner(var, classes, args.seeds, sample, device, schedule_note(var.kind, sample_kw['schedule'])))

    pairs, edit, paths = image_list(classes, args.seeds), None, []
    if args.edit_image:
        edit, paths = start_edit(args, vae, var, device, out_dir)

    t0 = time.perf_counter()
    with torch.inference_mode():
        imgs_N3HW, stats = generate(sampler, pairs, args.batch_size, sample_kw, edit, progress=args.progress)
    dt = time.perf_counter() - t0
    paths += write_images(imgs_N3HW, pairs, classes, args.seeds, out_dir, 'edit_' if edit else '', args.save_grid,
                          args.nrow, loaded.class_names)
    for line in describe_stats(stats, min(args.batch_size, len(pairs)), sample.cfg):
        log.info(line)
    log.info(f'{len(pairs)} images in {dt:.1f} s ({len(pairs) / dt:.2f} img/s); wrote {len(paths)} files to {out_dir}')
    return paths


if __name__ == '__main__':
    main()
