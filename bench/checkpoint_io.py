"""What safe checkpoint I/O costs (a benchmark, not a test): a slim export written and read as .pth
(weights-only load) and as .safetensors, side by side in one process, plus the sha256 check of a download.

    python bench/checkpoint_io.py --depth 16            # VIAR-d16-sized random weights (width 1024)

Prints seconds (best of --reps, wall clock) and the ratios .safetensors / .pth, with the machine and its load.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def best_of(fn: Callable[[], object], reps: int) -> float:
    """Shortest wall time of `reps` calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main(argv=None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--pre_depth', type=int, default=5)
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--dir', type=str, default=None, help='folder for the files (default: a temp folder)')
    args = p.parse_args(argv)
    from bench.sample_speed import machine_line
    from models.config import ModelSpec
    from utils.checkpoint import read_checkpoint, save_atomic, sha256_of
    from utils.model_io import slim_export
    from utils.safetensors_io import write_safetensors
    torch.set_num_threads(1)
    spec = ModelSpec(depth=args.depth, use_implicit=True, pre_depth=args.pre_depth, post_depth=args.pre_depth)
    vae, var = spec.build('cpu')
    export = slim_export(var, spec, vae=vae)
    n_bytes = sum(t.numel() * t.element_size() for part in ('model', 'vae') for t in export[part].values())
    folder = args.dir or tempfile.mkdtemp(prefix='ckpt_io_')
    pth, sft = os.path.join(folder, 'slim.pth'), os.path.join(folder, 'slim.safetensors')
    r = {'MiB': n_bytes / 2 ** 20}
    r['write_pth_s'] = best_of(lambda: save_atomic(export, pth), args.reps)
    r['write_safetensors_s'] = best_of(lambda: write_safetensors(export, sft), args.reps)
    r['read_pth_s'] = best_of(lambda: read_checkpoint(pth), args.reps)
    r['read_pth_mmap_s'] = best_of(lambda: read_checkpoint(pth, mmap=True), args.reps)
    r['read_safetensors_s'] = best_of(lambda: read_checkpoint(sft), args.reps)
    r['sha256_s'] = best_of(lambda: sha256_of(pth, cached=False), args.reps)
    print(f'{spec.kind} depth {spec.depth} (width {spec.width}) + tokenizer: {r["MiB"]:.0f} MiB of tensors; '
          f'{machine_line()}; torch {torch.__version__}, 1 thread; best of {args.reps}, wall clock')
    print(f'write: .pth {r["write_pth_s"]:.2f} s, .safetensors {r["write_safetensors_s"]:.2f} s '
          f'(ratio {r["write_safetensors_s"] / r["write_pth_s"]:.2f})')
    print(f'read:  .pth weights-only {r["read_pth_s"]:.2f} s (mmap {r["read_pth_mmap_s"]:.2f} s), .safetensors '
          f'{r["read_safetensors_s"]:.2f} s (ratio {r["read_safetensors_s"] / r["read_pth_s"]:.2f})')
    print(f'sha256 of the .pth: {r["sha256_s"]:.2f} s ({r["MiB"] / r["sha256_s"]:.0f} MiB/s); a slim save writes '
          f'both files: {(r["write_pth_s"] + r["write_safetensors_s"]) / r["write_pth_s"]:.2f}x the .pth alone')
    if args.dir is None:
        for f in (pth, sft):
            os.remove(f)
        os.rmdir(folder)
    return r


if __name__ == '__main__':
    main()
