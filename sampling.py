"""Sample the 50,000 images of the FID protocol (50 per ImageNet class) into PNGs and one `.npz`; resumable.

    python sampling.py --ckpt_path ckpts/viar.pth --use_implicit True --cfg 1.5 --iter_left 10 --iter_right 10
    torchrun --nproc_per_node=8 sampling.py ...   (same images for any number of processes)

Writes `<sample_dir>/<name>/000000.png ...`, `<name>.npz` and `<name>.json`; a batch's seed is a pure function
of (seed, class, chunk), so the images do not depend on the process count. Outputs, naming, seeds and resuming:
docs/SAMPLING.md.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import dist
from utils import cli
from utils.arch_flags import describe_model
from utils.atomic import is_temp_name, write_json_atomic
from utils.eval.npz_io import EvalInputError, load_png, pack_npz
from utils.logging_util import get_logger
from utils.memory import peak_memory
from utils.model_io import load_sampler
from utils.sample.config import add_model_source_args, add_sample_args, parse, resolve_device
from utils.sample.image_io import png_complete, to_uint8_BHWC, write_png
from utils.sample.schedule_flags import schedule_note, schedule_settings

log = get_logger('sampling', is_master=False)   # set up for this rank in main()
SETTINGS_FILE = '.plan.json'   # inside the image folder: the settings its images were made with
MEASURED = ('seconds', 'model_seconds', 'images_per_s', 'images_per_s_with_io', 'iters_per_scale', 'peak_memory_bytes',
            'peak_memory_kind', 'per_rank')


# ---------------------------------------------------------------- the global batches (pure)

@dataclass(frozen=True)
class Batch:
    """One sampling call: `size` images of class `label` from global index `start`, generator seed `seed`."""
    order: int      # position in the global list of batches
    label: int
    chunk: int      # chunk number inside the class
    start: int
    size: int
    seed: int

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.size)


def batch_seed(seed: int, label: int, chunk: int) -> int:
    """A distinct, well-mixed 63-bit generator seed for every (seed, class, chunk)."""
    state = np.random.SeedSequence([seed, label, chunk]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1   # torch.Generator.manual_seed takes any int below 2**64; keep it positive in any int64


def official_batch_seed(seed: int, label: int, chunk: int) -> int:
    """The official sampling.py rule: `seed + chunk` for every class, so all classes share the same noise streams."""
    return seed + chunk


def make_batches(num_classes: int, per_class: int, batch_size: int, seed: int = 1,
                 official_seeds: bool = False) -> List[Batch]:
    """All batches in global order (class-major, then chunk); the last chunk of a class may be smaller."""
    for name, value in (('num_classes', num_classes), ('per_class', per_class), ('batch_size', batch_size)):
        if int(value) < 1:
            raise ValueError(f'--{name} must be >= 1, got {value}')
    if seed < 0:
        raise ValueError(f'--seed must be >= 0, got {seed}')
    seed_fn = official_batch_seed if official_seeds else batch_seed
    batches = []
    for label in range(num_classes):
        for chunk, j in enumerate(range(0, per_class, batch_size)):
            batches.append(Batch(order=len(batches), label=label, chunk=chunk, start=label * per_class + j,
                                 size=min(batch_size, per_class - j), seed=seed_fn(seed, label, chunk)))
    return batches


def rank_share(items: Sequence, rank: int, world_size: int) -> list:
    """Round-robin split: rank r takes items r, r + W, r + 2W, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} outside world size {world_size}')
    return list(items[rank::world_size])


def png_name(index: int) -> str:
    """File name of image `index`, as the official script names it."""
    return f'{index:06d}.png'


def run_name_head(kind: str, depth: int) -> str:
    """Head of the official sample-folder name: 'implicit' for a VIAR, 'd<depth>' for a VAR."""
    return 'implicit' if kind == 'VIAR' else f'd{depth}'


def sample_folder_name(head: str, ckpt_path: str, cfg: float, seed: int) -> str:
    """Official folder name <head>-<ckpt basename>-cfg-<cfg>-seed-<seed>; head: `run_name_head`."""
    return f'{head}-{os.path.basename(os.path.normpath(ckpt_path))}-cfg-{float(cfg)}-seed-{seed}'   # folder/ too


# ---------------------------------------------------------------- resuming a folder

def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def image_settings(args: argparse.Namespace, sample, spec, sample_kw: dict, num_classes: int, dtype: str,
                   kind: str) -> Dict:
    """Everything that decides the pixels of image i; a resumed run must match it."""
    return json.loads(json.dumps(dict(
        var_ckpt=os.path.abspath(args.var_ckpt), vae_ckpt=os.path.abspath(args.vae_ckpt) if args.vae_ckpt else '',
        ema=bool(args.ema), model=spec.to_dict(), cfg=sample.cfg, top_k=sample.top_k, top_p=sample.top_p,
        seed=args.seed, official_seeds=bool(args.official_seeds), num_classes=num_classes, per_class=args.per_class,
        batch_size=args.batch_size, dtype=dtype,
        **schedule_settings(kind, sample_kw['schedule'], sample_kw['fill_forward'], sample_kw['solver']))))


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


def find_todo(folder: str, batches: List[Batch], settings: Dict) -> List[tuple]:
    """Rank 0 checks the folder's settings and lists (batch, indices without a complete PNG); every rank gets the
    same list, so no batch is done twice or lost."""
    todo, error = None, None
    if dist.get_rank() == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            old = read_json(os.path.join(folder, SETTINGS_FILE))
            if old is not None and old != settings:
                raise SystemExit(f'error: {folder} holds images sampled with other settings ('
                                 + '; '.join(settings_diff(old, settings)) + '). Use another --sample_dir, or '
                                 'delete the folder to start over.')
            write_json_atomic(settings, os.path.join(folder, SETTINGS_FILE))
            todo = [(b, idx) for b in batches
                    for idx in [[i for i in b.indices if not png_complete(os.path.join(folder, png_name(i)))]] if idx]
        except SystemExit as e:
            error = str(e)
        except OSError as e:   # a full disk or a read-only folder (utils.atomic.WriteError): its one line
            error = f'error: {e}'
    todo, error = dist.broadcast_object((todo, error))
    if error:
        raise SystemExit(error)
    return todo


# ---------------------------------------------------------------- sampling and packing

def sample_todo(sampler, todo: List[tuple], folder: str, sample_kw: dict, total: int, progress: bool) -> Dict:
    """Make this rank's round-robin share of `todo` into PNGs; returns this rank's figures."""
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
        label_B = torch.full((batch.size,), batch.label, dtype=torch.long, device=device)
        with torch.inference_mode():
            img_B3HW, st = sampler(batch.size, label_B, g_seed=batch.seed, return_stats=True, **sample_kw)
        imgs_BHW3 = to_uint8_BHWC(img_B3HW)   # on the CPU: synchronised
        model_seconds += time.perf_counter() - t1
        for i in idx:
            write_png(imgs_BHW3[i - batch.start], os.path.join(folder, png_name(i)))
        iters.append(list(st.iters))
        n_images += len(idx)
        bar.update(sum(len(i) for _, i in todo[k * world:(k + 1) * world]))   # rank 0 sees its round's progress
    bar.close()
    sums = [sum(col) for col in zip(*iters)] if iters and iters[0] else None
    return dict(images=n_images, seconds=time.perf_counter() - t0, model_seconds=model_seconds, batches=len(iters),
                iters_sum=sums, peak_memory=peak_memory(device))


def summarize(per_rank: List[Dict], var, schedule) -> Dict:
    """Merge the ranks' figures: images/s over the slowest rank's time, mean implicit iterations per scale."""
    images = sum(r['images'] for r in per_rank)
    seconds = max(r['seconds'] for r in per_rank)
    model_seconds = max(r['model_seconds'] for r in per_rank)
    batches = sum(r['batches'] for r in per_rank)
    sums = [r['iters_sum'] for r in per_rank if r['iters_sum']]
    return dict(
        images_sampled_this_run=images, seconds=seconds, model_seconds=model_seconds,
        images_per_s=images / model_seconds if images and model_seconds > 0 else None,
        images_per_s_with_io=images / seconds if images and seconds > 0 else None,
        iters_per_scale=[sum(col) / batches for col in zip(*sums)] if sums else None,
        iters_per_scale_planned=schedule_settings(var.kind, schedule, True).get('counts'),
        schedule=schedule_note(var.kind, schedule),
        peak_memory_bytes=max(r['peak_memory']['bytes'] for r in per_rank),
        peak_memory_kind=per_rank[0]['peak_memory']['kind'], per_rank=per_rank)


def read_sample(path: str) -> np.ndarray:
    """One sample as uint8 (H, W, 3); an unreadable file is removed so that a rerun makes it again."""
    try:
        return load_png(path)
    except EvalInputError as e:
        os.remove(path)
        raise SystemExit(f'error: {e}; removed it. Run the same command again to make it anew.') from None


def finish(folder: str, total: int, report: Dict, progress: bool) -> str:
    """Rank 0, after every rank is done: drop half-written PNGs of killed runs, pack the .npz, write the JSON."""
    for name in os.listdir(folder):
        if is_temp_name(name):
            os.remove(os.path.join(folder, name))
    paths = [os.path.join(folder, png_name(i)) for i in range(total)]
    absent = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
    if absent:
        raise SystemExit(f'error: {len(absent)} of {total} images are missing in {folder} (first: {absent[:5]}). '
                         f'Run the same command again to make them.')
    npz_path = f'{folder}.npz'
    try:
        shape = pack_npz(paths, npz_path, read=read_sample, progress=progress)
    except EvalInputError as e:
        raise SystemExit(f'error: {e}; the folder mixes runs. Remove it and sample again.') from None
    report = dict(npz=npz_path, images=total, shape=list(shape), **report)
    old = read_json(f'{folder}.json')
    if report['images_sampled_this_run'] == 0 and old:   # a re-pack only: keep the figures of the run that sampled
        report.update({k: old[k] for k in MEASURED if k in old}, figures_from_earlier_run=True)
    write_json_atomic(report, f'{folder}.json')
    speed = f'{report["images_per_s"]:.2f} img/s' if report['images_per_s'] else 'nothing new sampled'
    log.info(f'wrote {npz_path} {tuple(shape)} and {folder}.json ({speed}, peak memory '
             f'{report["peak_memory_bytes"] / 2 ** 30:.2f} GiB {report["peak_memory_kind"]})')
    return npz_path


def setup_device(args: argparse.Namespace) -> torch.device:
    """Join the torchrun group (if any); this rank's device is cuda:<local rank> or the one asked for."""
    asked = resolve_device(args.device)
    device = dist.initialize('cuda' if asked.type == 'cuda' else 'cpu')
    if asked.type == 'cuda' and asked.index is not None and dist.get_world_size() == 1:
        device = asked
        torch.cuda.set_device(device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    return device


@cli.exits_on_write_error
def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """Split the global batches over the ranks, sample what is missing, then rank 0 packs the .npz and JSON."""
    global log
    args, source, sample = parse(build_parser(), argv)
    device = setup_device(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = get_logger('sampling', is_master=rank == 0)
    try:
        # --compile changes rounding only, so it is no resume setting; --fast's dtype (sampler.dtype) is one
        loaded, sampler, sample = load_sampler(source, sample, device, log=log.warning, info=log.info)
        args.var_ckpt, var, spec, dtype = loaded.ckpt, loaded.var, loaded.spec, sampler.dtype
        num_classes = spec.num_classes if args.sample_classes is None else args.sample_classes
        if num_classes > spec.num_classes:
            raise SystemExit(f'error: --num_classes {num_classes} but the model has {spec.num_classes} classes.')
        try:
            batches = make_batches(num_classes, args.per_class, args.batch_size, args.seed, args.official_seeds)
        except ValueError as e:
            raise SystemExit(f'error: {e}') from None
        sample_kw = sample.call_kwargs(len(var.patch_nums))
        folder = os.path.join(args.sample_dir, sample_folder_name(run_name_head(var.kind, var.depth), args.var_ckpt,
                                                                  sample.cfg, args.seed))
        settings = image_settings(args, sample, spec, sample_kw, num_classes, dtype, var.kind)
        todo = find_todo(folder, batches, settings)
        total = num_classes * args.per_class
        if args.stop_after:
            todo = todo[:args.stop_after]
        log.info(f'{describe_model(var)}; {schedule_note(var.kind, sample_kw["schedule"])}; {world} process(es), '
                 f'{dtype}, {total} images in {len(batches)} batches, {sum(len(i) for _, i in todo)} to make -> '
                 f'{folder}')
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


def build_parser() -> argparse.ArgumentParser:
    """The official sampling.py flags plus the schedule, batching, precision and resume flags."""
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
    o = p.add_argument_group('batches and output')
    o.add_argument('--num_classes', dest='sample_classes', type=int, default=None, metavar='N',
                   help="sample classes 0..N-1; None = all of the model's classes (1000 for ImageNet)")
    o.add_argument('--per_class', type=int, default=50, help='images per class')
    o.add_argument('--batch_size', type=int, default=25,
                   help='images per forward pass (capped at per_class: a batch never mixes classes); '
                        'it decides the batches, so changing it changes the images')
    o.add_argument('--sample_dir', type=str, default='samples')
    cli.add_bool_arg(o, '--progress', True, 'tqdm progress bar with ETA (rank 0)')
    o.add_argument('--stop_after', type=int, default=0,
                   help='debugging: stop after this many of the global batches, before packing (tests resume)')
    return p


if __name__ == '__main__':
    main()
