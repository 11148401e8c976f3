"""The training data loader alone (`bench/train_speed.py --loader`): images/s and images per CPU-second at 256 px.

Each image goes through what training does to it: JPEG decode, LANCZOS resize of the shorter side to 288 px,
random 256 px crop, to tensor in [-1, 1], batched by the resumable sampler (utils/data). With `--workers 0` the
training process does it all (the official setting); with N workers the CPU seconds of the worker processes
are counted too (getrusage of the children, after the loader shut them down), so "img per CPU-s" is the rate
one core sustains, whatever the number of workers. The folder is --data_path (class folders of JPEGs), else a
temporary folder of synthetic JPEGs of ImageNet's typical size (500x375, smooth content plus grain, quality 90:
about 100 KB each, near ImageNet's average of about 110 KB a file; pure noise would decode slower than photos).

CPUs a GPU needs = (images/s the GPU trains) / (img per CPU-s); the README works an example.
"""
import os
import resource
import shutil
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader


def make_jpegs(root: str, n: int, size=(500, 375), classes: int = 4, seed: int = 0) -> str:
    """n smooth synthetic JPEGs in `classes` class folders under root/train (and one per class in root/val)."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', n), ('val', classes)):
        for i in range(count):
            d = os.path.join(root, split, f'c{i % classes}')
            os.makedirs(d, exist_ok=True)
            low = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize(size, Image.BICUBIC)
            noise = rng.integers(-32, 33, (size[1], size[0], 3))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
            img.save(os.path.join(d, f'{i}.JPEG'), quality=90)
    return root


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure_loader(data: str, workers: int, batches: int, batch_size: int, reso: int = 256, warmup: int = 1) -> Dict:
    """Wall-clock and CPU rate of `batches` batches through the training loader with `workers` processes."""
    from utils.data.datasets import build_datasets
    from utils.data.loader import loader_kwargs
    from utils.data.sampler import DistInfiniteBatchSampler
    _, train_set, _ = build_datasets(data, reso, round(1.125 * reso), hflip=False)
    sampler = DistInfiniteBatchSampler(len(train_set), batch_size, seed=0)
    loader = DataLoader(train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(0),
                        **loader_kwargs(workers, pin=False))
    cpu0, kids0 = time.process_time(), children_cpu_s()
    it = iter(loader)
    for _ in range(warmup):   # worker start-up and the first batch are not the steady rate
        next(it)
    t0, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - cpu1
    del it, loader   # persistent workers exit here, so their CPU time reaches RUSAGE_CHILDREN
    kids = children_cpu_s() - kids0
    n = batches * batch_size
    if workers == 0:
        return dict(workers=0, images=n, wall_s=wall, img_per_s=n / wall, cpu_s=main_cpu, img_per_cpu_s=n / main_cpu)
    # workers also made the warmup batch and up to prefetch_factor batches each that were never consumed: their
    # CPU time is reported, not turned into a per-CPU rate (workers=0 gives that cleanly)
    return dict(workers=workers, images=n, wall_s=wall, img_per_s=n / wall, cpu_s=kids + time.process_time() - cpu0,
                img_per_cpu_s=None)


def run(args) -> List[Dict]:
    """Print one row per worker count; returns the rows."""
    import sys
    from bench.sample_speed import machine_line
    tmp = None
    data = args.data_path
    if not data:
        tmp = tempfile.mkdtemp(prefix='loader_bench_')
        w, h = (int(t) for t in args.image_size.split('x'))
        data = make_jpegs(tmp, args.loader_images, (w, h))
    try:
        print(f'# machine: {machine_line()}; torch threads {torch.get_num_threads()}; {sys.executable}')
        print(f'# loader: {data if args.data_path else f"{args.loader_images} synthetic {args.image_size} JPEGs"}, '
              f'{args.reso} px crops of a {round(1.125 * args.reso)} px LANCZOS resize, batch {args.batch}')
        print(f'{"workers":>7s} {"images":>6s} {"wall s":>7s} {"img/s":>7s} {"CPU s":>7s} {"img per CPU-s":>13s} '
              f'{"vs N x 1 core":>13s}')
        rows = []
        worker_counts = sorted({0, *(int(t) for t in args.loader_workers.split(','))})
        for w in worker_counts:
            r = measure_loader(data, w, args.loader_batches, args.batch, args.reso)
            rows.append(r)
            per_cpu = f'{r["img_per_cpu_s"]:13.1f}' if r['img_per_cpu_s'] else f'{"-":>13s}'
            scaling = f'{r["img_per_s"] / (w * rows[0]["img_per_cpu_s"]):13.2f}' if w else f'{"-":>13s}'
            print(f'{w:7d} {r["images"]:6d} {r["wall_s"]:7.2f} {r["img_per_s"]:7.1f} {r["cpu_s"]:7.2f} {per_cpu} {scaling}')
        per_core = rows[0]['img_per_cpu_s']
        for rate in (float(t) for t in args.gpu_rates.split(',')):
            print(f'# a GPU training {rate:g} img/s needs {rate / per_core:.2f} CPU cores of loading at '
                  f'{per_core:.1f} img per CPU-s')
        return rows
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
