"""Memory per rank under `train.py --fsdp` (`bench/train_speed.py --fsdp`): arithmetic, meta-device shards, CPU RSS.

1. For VAR-d36 (512 px, shared AdaLN) and VIAR-d30 the fp32 parameter, gradient and AdamW bytes the fullest rank
   holds for 1..64 ranks: the arithmetic of utils/train/fsdp.py beside the shards FSDP2 really makes, read off
   the model built on the meta device and wrapped by dist.fsdp_shard under torch's fake process group (rank 0
   of W; nothing is allocated). Also the root unit, which stays gathered for the whole step (embeddings, head,
   shared AdaLN, and for VIAR the implicit block with its projection), in fp32 (the root keeps its dtype).
2. `--rss`: peak resident memory of a small model's training steps on the CPU, one rank (no sharding) beside two
   ranks (gloo, --fsdp), each in its own torchrun; once with glibc's default allocator settings and once with
   MALLOC_MMAP_THRESHOLD_=65536. FSDP frees each gathered unit after use, and glibc's default (a threshold that
   rises after the first large free) then keeps those blocks in the heap, so the default RSS is the allocator's
   high-water mark and grows over the first steps; with a fixed threshold large blocks are returned to the
   system when freed and RSS follows the live tensors.
"""
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLDS = (1, 2, 4, 8, 16, 32, 64)


def build_meta(name: str):
    """A full-size model on the meta device: 'VAR-d36' (512 px, shared AdaLN, width 2304) or 'VIAR-d30'."""
    from models import build_var
    from models.layout import PYRAMIDS
    from models.vqvae import VQVAE
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
        if name == 'VAR-d36':
            return build_var(vae, depth=36, embed_dim=2304, num_heads=36, shared_aln=True, attn_l2_norm=True,
                             patch_nums=PYRAMIDS[512])
        if name == 'VIAR-d30':
            return build_var(vae, depth=30, embed_dim=1920, num_heads=30, use_implicit=True, pre_depth=5,
                             post_depth=5, attn_l2_norm=True)
    raise ValueError(f'unknown model {name!r}')


def root_numel(var) -> int:
    """Parameters of the root unit: those no FSDP unit holds."""
    in_units = {id(p) for unit in var.fsdp_units() for m in unit for p in m.parameters()}
    return sum(p.numel() for p in var.parameters() if id(p) not in in_units)


def meta_rows(names=('VAR-d36', 'VIAR-d30'), worlds=WORLDS) -> List[Dict]:
    """One row per (model, world size): arithmetic and meta-shard bytes on rank 0."""
    import dist
    from utils.train.fsdp import measured_rank_bytes, rank_bytes
    rows = []
    for name in names:
        for world in worlds:
            var = build_meta(name)
            shapes = [tuple(p.shape) for p in var.parameters()]
            root = root_numel(var)
            with dist.fake_group(world):
                dist.fsdp_shard(var, var.fsdp_units(), torch.bfloat16, torch.float32)
                got = measured_rank_bytes(var.parameters(), lambda p: dist.local_part(p).numel())
            want = rank_bytes(shapes, world)
            rows.append(dict(model=name, world=world, params=sum(map(_numel, shapes)), want=want.__dict__,
                             got=got.__dict__, total=want.total, match=want == got, root_fp32=root * 4))
    return rows


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def print_meta(rows: List[Dict]):
    gib = 2 ** 30
    print(f'{"model":9s} {"params":>14s} {"ranks":>5s} {"params GiB":>10s} {"grads GiB":>9s} {"AdamW GiB":>9s} '
          f'{"total GiB":>9s} {"root fp32 GiB":>13s} {"meta shards = arithmetic":>24s}')
    for r in rows:
        w = r['want']
        print(f'{r["model"]:9s} {r["params"]:14,d} {r["world"]:5d} {w["params"] / gib:10.3f} {w["grads"] / gib:9.3f} '
              f'{w["optim"] / gib:9.3f} {r["total"] / gib:9.3f} {r["root_fp32"] / gib:13.3f} {str(r["match"]):>24s}')


# ---------------------------------------------------------------- measured RSS of a small model on the CPU

def child(depth: int, width: int, steps: int):
    """One torchrun worker: build, shard when there are several ranks, train `steps` steps; print its peak RSS."""
    sys.path.insert(0, ROOT)
    import torch.nn.functional as F
    import dist
    from models import build_vae_var
    from utils.train.fsdp import measured_rank_bytes
    dist.initialize('cpu')
    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vae, var = build_vae_var('cpu', patch_nums=(1, 2, 3, 4), V=4096, Cvae=32, ch=32, num_classes=1000, depth=depth,
                             embed_dim=width, num_heads=width // 64, vae_ch_mult=(1, 1), vae_num_res_blocks=1,
                             attn_l2_norm=True)
    var.train()
    if dist.initialized():
        dist.fsdp_shard(var, var.fsdp_units())
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(dist.get_rank())
    idx = [torch.randint(0, 4096, (2, p * p), generator=g) for p in (1, 2, 3, 4)]
    x = vae.quantize.idxBl_to_var_input(idx)
    t0 = time.process_time()
    for _ in range(steps):
        loss = F.cross_entropy(var(torch.tensor([1, 2]), x).flatten(0, 1), torch.cat(idx, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    held = measured_rank_bytes(var.parameters(), lambda p: dist.local_part(p).numel())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(rank=dist.get_rank(), world=dist.get_world_size(), peak_rss=peak, import_rss=base,
                          held=held.total, params=sum(p.numel() for p in var.parameters()),
                          cpu_s=time.process_time() - t0)), flush=True)
    dist.finalize()


def rss_rows(depth: int, width: int, steps: int, mmap_threshold: bool) -> List[Dict]:
    """Each rank's line from a 1-rank and a 2-rank torchrun."""
    rows = []
    for world in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, VIAR_DIST_TIMEOUT_S='300')
        env.pop('MALLOC_MMAP_THRESHOLD_', None)
        if mmap_threshold:
            env['MALLOC_MMAP_THRESHOLD_'] = '65536'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}',
               os.path.abspath(__file__), '--child', str(depth), str(width), str(steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f'the {world}-rank run failed:\n{proc.stderr[-3000:]}')
        rows += [dict(json.loads(line), malloc='mmap 64K' if mmap_threshold else 'default')
                 for line in proc.stdout.splitlines() if line.startswith('{')]
    return rows


def print_rss(rows: List[Dict]):
    mib = 2 ** 20
    print(f'{"malloc":>8s} {"ranks":>5s} {"rank":>4s} {"params":>12s} {"held MiB":>9s} {"peak RSS MiB":>12s} '
          f'{"RSS after imports":>17s} {"RSS growth MiB":>14s}')
    for r in rows:
        print(f'{r["malloc"]:>8s} {r["world"]:5d} {r["rank"]:4d} {r["params"]:12,d} {r["held"] / mib:9.1f} '
              f'{r["peak_rss"] / mib:12.1f} '
              f'{r["import_rss"] / mib:17.1f} {(r["peak_rss"] - r["import_rss"]) / mib:14.1f}')


def run(args) -> Dict:
    """bench/train_speed.py --fsdp: the meta table, and with --rss the measured one."""
    sys.path.insert(0, ROOT)
    from bench.sample_speed import machine_line
    print(f'# machine: {machine_line()}')
    print('# fp32 parameters + gradients + AdamW moments on the fullest rank under FSDP2 (bf16 runs gather bf16 '
          'copies for compute; the sharded state stays fp32)')
    out = dict(meta=meta_rows())
    print_meta(out['meta'])
    if args.rss:
        print(f'# peak RSS, CPU, VAR depth {args.rss_depth} width {args.rss_width}, scales 1..4, batch 2 per rank, '
              f'{args.rss_steps} AdamW steps; 1 rank unsharded, 2 ranks --fsdp (gloo); "held" = fp32 params + '
              f'grads + AdamW on the rank')
        out['rss'] = [r for thr in (False, True) for r in rss_rows(args.rss_depth, args.rss_width, args.rss_steps, thr)]
        print_rss(out['rss'])
    return out


if __name__ == '__main__' and len(sys.argv) > 1 and sys.argv[1] == '--child':
    child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
