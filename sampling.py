"""Sample the 50,000 images of the FID protocol (50 per ImageNet class) into PNGs and one `.npz`; resumable.

    python sampling.py --ckpt_path ckpts/viar.pth --use_implicit True --cfg 1.5 --iter_left 10 --iter_right 10
    torchrun --nproc_per_node=8 sampling.py ...   (same images for any number of processes)

Writes `<sample_dir>/<name>/000000.png ...`, `<sample_dir>/<name>.npz` (`arr_0`, uint8 NHWC in index order)
and `<sample_dir>/<name>.json` (config, iterations per scale, images/s, peak memory), with the official
`<name>` = `implicit-<ckpt>-cfg-<cfg>-seed-<seed>` (VIAR) or `d<depth>-<ckpt>-cfg-<cfg>-seed-<seed>` (VAR).
Run the same command again after a crash: finished PNGs are kept, the rest are made. See docs/SAMPLING.md.
"""
import argparse
import json
import os
import sys
import time
import zipfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import dist
from utils import cli
from utils.arch_flags import describe_model
from utils.atomic import atomic_path, is_temp_name, write_json_atomic
from utils.checkpoint import CheckpointError
from utils.logging_util import get_logger
from utils.memory import peak_memory
from utils.model_io import default_var_ckpt, load_or_build
from utils.sample.compile_util import SamplingError, prepare_for_sampling
from utils.sample.config import add_model_source_args, add_sample_args, parse, resolve_device
from utils.sample.plan import Batch, make_plan, png_name, rank_share, run_name_head, sample_folder_name
from utils.sample.schedule_flags import schedule_note, schedule_settings

log = get_logger('sampling', is_master=False)   # set up for this rank in main()
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_TRAILER = b'\x00\x00\x00\x00IEND\xaeB`\x82'   # the empty IEND chunk every complete PNG ends with
MEASURED = ('seconds', 'model_seconds', 'images_per_s', 'images_per_s_with_io', 'iters_per_scale', 'peak_memory_bytes',
            'peak_memory_kind', 'per_rank')
PLAN_FILE = '.plan.json'                          # inside the image folder: the settings its images were made with


def build_parser() -> argparse.ArgumentParser:
    """The official sampling.py flags plus the schedule, plan, precision and resume flags."""
    p = argparse.ArgumentParser(description='VAR / VIAR 50K sampler for FID (distributed, resumable)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_source_args(p, defaults=dict(depth=30), skip=('num_classes',))   # --num_classes: classes to sample
    add_sample_args(p, skip=('more_smooth',))   # visualisation only, never in FID sampling
    g = p.add_argument_group('seeds')
    g.add_argument('--seed', type=int, default=1, help='global seed; every batch derives its own from it')
    cli.add_bool_arg(g, '--official_seeds', False,
                     'official seed rule: batch seed = seed + chunk number inside the class, the same for all '
                     'classes (all classes then share the same few noise streams)')
    cli.add_bool_arg(g, '--tf32', True, 'TF32 matmuls on CUDA, as the official script')
    o = p.add_argument_group('plan and output')
    o.add_argument('--num_classes', dest='sample_classes', type=int, default=None, metavar='N',
                   help="sample classes 0..N-1; None = all of the model's classes (1000 for ImageNet)")
    o.add_argument('--per_class', type=int, default=50, help='images per class')
    o.add_argument('--batch_size', type=int, default=25,
                   help='images per forward pass (capped at per_class: a batch never mixes classes); '
                        'part of the plan, so changing it changes the images')
    o.add_argument('--sample_dir', type=str, default='samples')
    cli.add_bool_arg(o, '--progress', True, 'tqdm progress bar with ETA (rank 0)')
    o.add_argument('--stop_after', type=int, default=0,
                   help='debugging: stop after this many batches of the global plan, before packing (tests resume)')
    return p


# ---------------------------------------------------------------- files

def to_uint8_BHWC(img_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] images as uint8 (B, H, W, 3), truncating x * 255 as the official sampler does."""
    return img_B3HW.detach().float().clamp(0, 1).mul(255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


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


def write_png_atomic(img_HW3: np.ndarray, path: str):
    """Write a PNG under a temp name, then rename: a file with the final name is always complete."""
    from PIL import Image
    with atomic_path(path, durable=False, need=img_HW3.nbytes) as tmp:   # a lost PNG is remade: no fsync per image
        Image.fromarray(img_HW3).save(tmp, format='PNG')


def missing(folder: str, batch: Batch) -> List[int]:
    """Indices of `batch` without a complete PNG in `folder`."""
    return [i for i in batch.indices if not png_complete(os.path.join(folder, png_name(i)))]


def read_png(path: str) -> np.ndarray:
    """One sample as uint8 (H, W, 3); an unreadable file is removed so that a rerun makes it again."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert('RGB'), dtype=np.uint8)
    except Exception as e:
        os.remove(path)
        raise SystemExit(f'error: {path} is corrupt ({type(e).__name__}); removed it. Run the same command '
                         f'again to make it anew.') from None


def pack_npz(folder: str, num: int, npz_path: str, progress: bool = True) -> tuple:
    """Stream PNGs 0..num-1 into `npz_path` (`arr_0`, uint8 (num, H, W, 3)) one image at a time; atomic.

    Writes the .npy header for the full shape first, then each image's bytes, so memory stays at one
    image; the result is an ordinary uncompressed np.savez file. Returns the array shape.
    """
    from tqdm import tqdm
    absent = [i for i in range(num) if not os.path.isfile(os.path.join(folder, png_name(i)))]
    if absent:
        raise SystemExit(f'error: {len(absent)} of {num} images are missing in {folder} (first: {absent[:5]}). '
                         f'Run the same command again to make them.')
    first = read_png(os.path.join(folder, png_name(0)))
    shape = (num,) + first.shape
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False, 'shape': shape}
    with atomic_path(npz_path, need=int(np.prod(shape))) as tmp:
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for i in tqdm(range(num), desc='packing .npz', unit='img', disable=not progress, file=sys.stdout):
                    img = first if i == 0 else read_png(os.path.join(folder, png_name(i)))
                    if img.shape != first.shape:
                        raise SystemExit(f'error: {png_name(i)} is {img.shape}, {png_name(0)} is {first.shape}; '
                                         f'the folder mixes runs. Remove it and sample again.')
                    f.write(img.tobytes())
    return shape


def remove_temp_files(folder: str):
    """Delete half-written PNGs left by killed runs (only once every rank has finished writing)."""
    for name in os.listdir(folder):
        if is_temp_name(name):
            os.remove(os.path.join(folder, name))


def read_json(path: str):
    """The JSON in `path`, or None if absent."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- sampling

def sample_batch(sampler, batch: Batch, sample_kw: dict):
    """(uint8 images (B, H, W, 3), SampleStats) of one plan batch: its label and its generator seed."""
    label_B = torch.full((batch.size,), batch.label, dtype=torch.long, device=sampler.device)
    with torch.inference_mode():
        img_B3HW, stats = sampler(batch.size, label_B, g_seed=batch.seed, return_stats=True, **sample_kw)
    return to_uint8_BHWC(img_B3HW), stats


def plan_settings(args: argparse.Namespace, var, spec, sample_kw: dict, num_classes: int, dtype: str) -> Dict:
    """Everything that decides the pixels of image i; a resumed run must match it."""
    return json.loads(json.dumps(dict(
        var_ckpt=os.path.abspath(args.var_ckpt), vae_ckpt=os.path.abspath(args.vae_ckpt) if args.vae_ckpt else '',
        ema=bool(args.ema), model=spec.to_dict(), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        official_seeds=bool(args.official_seeds), num_classes=num_classes, per_class=args.per_class,
        batch_size=args.batch_size, dtype=dtype,
        **schedule_settings(var.kind, sample_kw['schedule'], sample_kw['fill_forward'], sample_kw['solver']))))


def settings_diff(old: Dict, new: Dict, prefix: str = '') -> List[str]:
    """'name: old -> new' for every setting that differs (nested dicts flattened as a.b)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f'{prefix}{k}.')
        elif a != b:
            out.append(f'{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}')
    return out


def check_plan_file(folder: str, settings: Dict):
    """Stop with a clear message (which setting, old and new value) when the folder holds images made
    with other settings."""
    old = read_json(os.path.join(folder, PLAN_FILE))
    if old is not None and old != settings:
        raise SystemExit(f'error: {folder} holds images sampled with other settings ('
                         + '; '.join(settings_diff(old, settings)) + '). Use another --sample_dir, or delete '
                         'the folder to start over.')


def run_stats(device, n_images: int, seconds: float, model_seconds: float, iters: List[List[int]]) -> Dict:
    """This rank's figures: images made, wall and model seconds, summed iterations per scale, peak memory."""
    sums = [sum(col) for col in zip(*iters)] if iters and iters[0] else None
    return dict(images=n_images, seconds=seconds, model_seconds=model_seconds, batches=len(iters), iters_sum=sums,
                peak_memory=peak_memory(device))


def summarize(per_rank: List[Dict], var, schedule) -> Dict:
    """Merge the ranks' figures: images/s over the slowest rank's time (model only, and with PNG writing)
    and the mean implicit iterations per scale (None when the model has no implicit block)."""
    images = sum(r['images'] for r in per_rank)
    seconds = max(r['seconds'] for r in per_rank)
    model_seconds = max(r['model_seconds'] for r in per_rank)
    batches = sum(r['batches'] for r in per_rank)
    sums = [r['iters_sum'] for r in per_rank if r['iters_sum']]
    planned = schedule_settings(var.kind, schedule, True).get('counts')
    return dict(
        images_sampled_this_run=images, seconds=seconds, model_seconds=model_seconds,
        images_per_s=images / model_seconds if images and model_seconds > 0 else None,
        images_per_s_with_io=images / seconds if images and seconds > 0 else None,
        iters_per_scale=[sum(col) / batches for col in zip(*sums)] if sums else None,
        iters_per_scale_planned=planned, schedule=schedule_note(var.kind, schedule),
        peak_memory_bytes=max(r['peak_memory']['bytes'] for r in per_rank),
        peak_memory_kind=per_rank[0]['peak_memory']['kind'], per_rank=per_rank)


def setup_device(args: argparse.Namespace) -> torch.device:
    """Join the torchrun group (if any) and pick this rank's device: cuda:<local rank>, or the one asked for."""
    asked = resolve_device(args.device)
    device = dist.initialize('cuda' if asked.type == 'cuda' else 'cpu')
    if asked.type == 'cuda' and asked.index is not None and dist.get_world_size() == 1:
        device = asked
        torch.cuda.set_device(device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    return device


def find_todo(folder: str, plan: List[Batch], settings: Dict) -> List[tuple]:
    """Rank 0 checks the folder and lists (batch, missing indices); every rank gets the same list."""
    todo, error = None, None
    if dist.get_rank() == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            check_plan_file(folder, settings)
            write_json_atomic(settings, os.path.join(folder, PLAN_FILE))
            todo = [(b, idx) for b in plan for idx in [missing(folder, b)] if idx]
        except SystemExit as e:
            error = str(e)
        except OSError as e:   # a full disk or a read-only folder (utils.atomic.WriteError): its one line
            error = f'error: {e}'
    todo, error = dist.broadcast_object((todo, error))   # one view of the folder: no batch done twice or lost
    if error:
        raise SystemExit(error)
    return todo


def sample_todo(sampler, todo: List[tuple], folder: str, sample_kw: dict, total: int, progress: bool) -> Dict:
    """Make this rank's round-robin share of `todo` into PNGs; returns this rank's figures."""
    from tqdm import tqdm
    rank, world = dist.get_rank(), dist.get_world_size()
    device = sampler.device
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    iters, n_images = [], 0
    bar = tqdm(total=total, initial=total - sum(len(i) for _, i in todo), unit='img', file=sys.stdout,
               disable=rank != 0 or not progress, dynamic_ncols=True)
    t0, model_seconds = time.perf_counter(), 0.0
    for k, (batch, idx) in enumerate(rank_share(todo, rank, world)):
        t1 = time.perf_counter()
        imgs_BHW3, st = sample_batch(sampler, batch, sample_kw)   # returns on the CPU: synchronised
        model_seconds += time.perf_counter() - t1
        for i in idx:
            write_png_atomic(imgs_BHW3[i - batch.start], os.path.join(folder, png_name(i)))
        iters.append(list(st.iters))
        n_images += len(idx)
        bar.update(sum(len(i) for _, i in todo[k * world:(k + 1) * world]))   # rank 0 sees its round's progress
    bar.close()
    return run_stats(device, n_images, time.perf_counter() - t0, model_seconds, iters)


def finish(folder: str, total: int, report: Dict, progress: bool) -> str:
    """Rank 0, after every rank is done: pack the .npz, write the JSON report beside it."""
    remove_temp_files(folder)
    npz_path = f'{folder}.npz'
    shape = pack_npz(folder, total, npz_path, progress=progress)
    report = dict(npz=npz_path, images=total, shape=list(shape), **report)
    old = read_json(f'{folder}.json')
    if report['images_sampled_this_run'] == 0 and old:   # a re-pack only: keep the figures of the run that sampled
        report.update({k: old[k] for k in MEASURED if k in old}, figures_from_earlier_run=True)
    write_json_atomic(report, f'{folder}.json')
    speed = f'{report["images_per_s"]:.2f} img/s' if report['images_per_s'] else 'nothing new sampled'
    log.info(f'wrote {npz_path} {tuple(shape)} and {folder}.json ({speed}, peak memory '
             f'{report["peak_memory_bytes"] / 2 ** 30:.2f} GiB {report["peak_memory_kind"]})')
    return npz_path


@cli.exits_on_write_error
def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """Split the global plan over the ranks, sample what is missing, then rank 0 packs the .npz and JSON."""
    global log
    args, source, sample = parse(build_parser(), argv)
    device = setup_device(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = get_logger('sampling', is_master=rank == 0)
    dtype = sample.resolved_dtype(device.type)   # --fast picks it from this machine: part of the resume settings
    try:
        try:
            loaded = load_or_build(source, device, log=log.warning)
            args.var_ckpt = source.var_ckpt or default_var_ckpt(source.spec())
            var, spec = loaded.var, loaded.spec
            # eval mode; --compile compiles in place (not part of the resume settings: it only changes rounding)
            sampler = prepare_for_sampling(var, compile=sample.compile, dtype=dtype, fast=sample.fast)
            sample.check_model(var, log=log.warning)
        except (CheckpointError, SamplingError) as e:
            raise SystemExit(f'error: {e}') from None
        num_classes = spec.num_classes if args.sample_classes is None else args.sample_classes
        if num_classes > spec.num_classes:
            raise SystemExit(f'error: --num_classes {num_classes} but the model has {spec.num_classes} classes.')
        try:
            plan = make_plan(num_classes, args.per_class, args.batch_size, args.seed, args.official_seeds)
        except ValueError as e:
            raise SystemExit(f'error: {e}') from None
        sample_kw = sample.call_kwargs(len(var.patch_nums))
        folder = os.path.join(args.sample_dir, sample_folder_name(run_name_head(var.kind, var.depth), args.var_ckpt,
                                                                  args.cfg, args.seed))
        settings = plan_settings(args, var, spec, sample_kw, num_classes, dtype)
        todo = find_todo(folder, plan, settings)
        total = num_classes * args.per_class
        if args.stop_after:
            todo = todo[:args.stop_after]
        log.info(f'{describe_model(var)}; {schedule_note(var.kind, sample_kw["schedule"])}; {world} process(es), '
                 f'{dtype}, {total} images in {len(plan)} batches, {sum(len(i) for _, i in todo)} to make -> {folder}')
        mine = sample_todo(sampler, todo, folder, sample_kw, total, args.progress)
        if args.stop_after:
            log.info(f'stopped after {len(todo)} batches (--stop_after); run again without it to finish.')
            return None
        per_rank = dist.all_gather_object(mine)
        if rank != 0:
            return None
        report = dict(world_size=world, device=str(device), model=spec.to_dict(),
                      **summarize(per_rank, var, sample_kw['schedule']),
                      config=dict(vars(args), dtype=dtype, num_classes=num_classes), settings=settings)
        return finish(folder, total, report, args.progress)
    finally:
        dist.finalize()


if __name__ == '__main__':
    main()
