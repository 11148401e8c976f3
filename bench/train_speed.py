"""Training benchmarks (not tests), one mode each; docs/TRAINING.md reports their figures.

  steps        AdamW step time of VAR and VIAR over effective depth, the bytes saved for backward, the CUDA peak;
               --official PATH runs the official models beside ours
  loader       the training data loader alone: images/s and images per CPU-second (alias --loader)
  fsdp_memory  fp32 state bytes per rank under `train.py --fsdp`; --rss: peak RSS at 1 and 2 ranks (alias --fsdp)
  token_cache  a training step from image files against one from the token cache (scripts/extract_tokens.py)

    .venv/bin/python bench/train_speed.py --width 128 --depths 4,8,16,24 --official /path/to/VIAR
    .venv/bin/python bench/train_speed.py --mode loader --loader_images 384 --loader_batches 48
    .venv/bin/python bench/train_speed.py --mode fsdp_memory --rss
    .venv/bin/python bench/train_speed.py --mode token_cache --threads 1 --steps 5 --demo_vae demo_output/vae/vae.pth
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

if __name__ == '__main__':   # `python bench/train_speed.py`: the project root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dist  # noqa: E402
from bench import measure  # noqa: E402
from models import VQVAE, build_vae_var, build_var  # noqa: E402
from models.config import ModelSpec  # noqa: E402
from models.layout import PYRAMIDS  # noqa: E402
from scripts.extract_tokens import main as extract  # noqa: E402
from trainer import VARTrainer  # noqa: E402
from utils import cli  # noqa: E402
from utils.atomic import write_json_atomic  # noqa: E402
from utils.checkpoint import load_vae_weights, save_atomic  # noqa: E402
from utils.cli import flag  # noqa: E402
from utils.data.datasets import build_datasets  # noqa: E402
from utils.data.loader import loader_kwargs  # noqa: E402
from utils.data.sampler import DistInfiniteBatchSampler  # noqa: E402
from utils.data.token_cache import CacheBatchSampler, TokenShards, open_cache  # noqa: E402
from utils.sample.config import resolve_device  # noqa: E402
from utils.train.amp_opt import AmpOptimizer, build_adamw  # noqa: E402
from utils.train.fsdp import measured_rank_bytes, rank_bytes  # noqa: E402
from utils.train.lr_control import param_groups  # noqa: E402

MODES = ('steps', 'loader', 'fsdp_memory', 'token_cache')
DEFAULTS = dict(steps=5, warmup=2, threads=0)   # --steps, --warmup, --threads when not given; token_cache's below
TOKEN_CACHE_DEFAULTS = dict(steps=6, warmup=1, threads=1)
GiB, MiB = 2 ** 30, 2 ** 20


@dataclass
class BenchArgs:
    """What every mode reads."""
    mode: str = flag('steps', 'what to measure', choices=MODES)
    batch: int = flag(8, 'images per step (steps, loader)')
    steps: Optional[int] = flag(None, 'timed steps of each kind (default: steps 5, token_cache 6)')
    warmup: Optional[int] = flag(None, 'untimed steps first (default: steps 2, token_cache 1)')
    threads: Optional[int] = flag(None, "torch threads (default: torch's own; token_cache 1)")
    json: str = flag('', 'also write the rows here')


@dataclass
class StepArgs:
    """--mode steps: VIAR at effective depth D is 1 pre-block, n = D - 2 - m iterations without grad, m with, 1 post."""
    width: int = flag(128, 'transformer width')
    heads: int = flag(4, 'attention heads')
    pn: Tuple[int, ...] = flag((1, 2, 3, 4, 5, 6), "token-map sides, '_'-separated")
    V: int = flag(512, 'vocabulary size')
    Cvae: int = flag(16, 'tokenizer latent channels')
    num_classes: int = flag(10, 'classes')
    depths: Tuple[int, ...] = flag((4, 8, 12, 16), 'effective depths')
    m: int = flag(2, 'VIAR iterations with grad')
    device: str = flag('auto', 'auto, cpu or cuda')
    bf16: bool = flag(False, 'bf16 autocast (CUDA)')
    models: str = flag('var,viar', 'which of var, viar to run')
    official: str = flag('', 'path of an official VIAR checkout to compare with')


@dataclass
class LoaderArgs:
    """--mode loader: JPEG decode, LANCZOS resize of the shorter side to 1.125 x reso, random crop, to tensor."""
    data_path: str = flag('', 'class folders of JPEGs (default: synthetic ones)')
    loader_images: int = flag(64, 'synthetic JPEGs to make')
    image_size: str = flag('500x375', 'synthetic JPEG size, WxH')
    reso: int = flag(256, 'training resolution (crop side)')
    loader_workers: Tuple[int, ...] = flag((0, 2), 'worker counts to measure (0 always)')
    loader_batches: int = flag(8, 'timed batches per worker count')
    gpu_rates: str = flag('74,150,300', 'GPU training rates (img/s) to size CPUs for')


@dataclass
class FsdpArgs:
    """--mode fsdp_memory: the bytes per rank of VAR-d36 and VIAR-d30, from arithmetic and from meta-device shards."""
    rss: bool = flag(False, 'also measure peak RSS of a small model at 1 and 2 ranks')
    rss_depth: int = flag(12, 'depth of the --rss model')
    rss_width: int = flag(768, 'width of the --rss model')
    rss_steps: int = flag(3, 'AdamW steps of the --rss model')
    rss_child: bool = flag(False, argparse.SUPPRESS)   # one torchrun worker of --rss


@dataclass
class TokenCacheArgs:
    """--mode token_cache: image steps and cached steps alternate in one process, so both see the same load."""
    configs: str = flag('demo,official256', 'comma list of: demo, official256')
    demo_vae: str = flag('', "the demo's tokenizer (DEMO_OUT/vae/vae.pth); random weights if empty")
    demo_data: str = flag('', "the demo's digit folder (DEMO_OUT/digits); synthetic if empty")


GROUPS = (BenchArgs, StepArgs, LoaderArgs, FsdpArgs, TokenCacheArgs)


def parse_args(argv=None):
    """(BenchArgs, {group class: its parsed dataclass}) with the mode's defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for clz in GROUPS:
        cli.add_dataclass_args(p, clz, clz.__doc__.split(':')[0] if clz is not BenchArgs else 'all modes')
    p.add_argument('--loader', dest='mode', action='store_const', const='loader', help='same as --mode loader')
    p.add_argument('--fsdp', dest='mode', action='store_const', const='fsdp_memory', help='same as --mode fsdp_memory')
    ns = p.parse_args(argv)
    groups = {clz: cli.from_namespace(clz, ns) for clz in GROUPS}
    b = groups[BenchArgs]
    for k, v in (TOKEN_CACHE_DEFAULTS if b.mode == 'token_cache' else DEFAULTS).items():
        if getattr(b, k) is None:
            setattr(b, k, v)
    return b, groups


def make_jpegs(root: str, n: int, size=(500, 375), classes: int = 4) -> str:
    """n synthetic JPEGs in `classes` folders under root/train, one per class in root/val: smooth content plus grain
    at quality 90, ~100 KB at 500x375 like ImageNet's average (pure noise decodes slower)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', n), ('val', classes)):
        for i in range(count):
            d = os.path.join(root, split, f'c{i % classes}')
            os.makedirs(d, exist_ok=True)
            low = rng.integers(0, 256, (max(1, size[1] // 16), max(1, size[0] // 16), 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), dtype=np.int16)
            img = np.clip(img + rng.integers(-32, 33, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f'{i}.JPEG'), quality=90)
    return root


# ---------------------------------------------------------------- steps

def step_configs(s: StepArgs) -> List[Dict]:
    """(model, effective depth, n, m) rows; VIAR rows need D >= m + 2."""
    return [dict(model=kind, eff_depth=D, n=D - 2 - s.m if kind == 'viar' else 0, m=s.m if kind == 'viar' else 0)
            for D in s.depths for kind in s.models.split(',') if kind == 'var' or D - 2 - s.m >= 0]


def our_step_row(s: StepArgs, row: Dict, common: Dict, step_kw: Dict) -> Dict:
    """This project's model for one row, measured."""
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=s.V, z_channels=s.Cvae, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=s.pn,
                ch_mult=(1, 2), num_res_blocks=1)
    var = build_var(vae, use_implicit=row['model'] == 'viar', pre_depth=1, post_depth=1, **common)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    jfb = (row['n'], row['m'])
    return measure.train_step_row(var, vae, lambda label_B, x_BLCv: var(label_B, x_BLCv, jfb_iters=jfb), **step_kw)


def step_cells(r: Dict) -> List[str]:
    """One printed row of --mode steps, with the official figures and ours / official if any."""
    cells = [r['model'], r['eff_depth'], r['n'], r['m'], f'{r["params_m"]:.3f}', f'{r["step_ms"]:.1f}',
             f'{r["saved_act_mib"]:.2f}', '-' if r['peak_mib'] is None else f'{r["peak_mib"]:.1f}']
    o = r.get('official')
    return cells + ([f'{o["step_ms"]:.1f}', f'{o["saved_act_mib"]:.2f}', f'{r["step_ms"] / o["step_ms"]:.2f}',
                     f'{r["saved_act_mib"] / max(o["saved_act_mib"], 1e-9):.2f}'] if o else [])


def run_steps(b: BenchArgs, s: StepArgs) -> List[Dict]:
    """Our rows, each with the official child's row of its config under --official."""
    device = str(resolve_device(s.device))
    step_kw = dict(V=s.V, batch=b.batch, num_classes=s.num_classes, patch_nums=s.pn, steps=b.steps, warmup=b.warmup,
                   bf16=s.bf16, device=device)
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(b.threads)} if b.threads else {}))
    official = s.official and measure.official_child(s.official, env=env, cwd=os.path.abspath(s.official))
    rows = []
    try:
        for row in step_configs(s):
            common = dict(num_classes=s.num_classes, depth=max(row['eff_depth'], 3), embed_dim=s.width,
                          num_heads=s.heads, drop_path_rate=0.0, attn_l2_norm=True, patch_nums=s.pn)
            rows.append(dict(row, **our_step_row(s, row, common, step_kw)))
            if official:   # a child process: the official package is also called `models`
                rows[-1]['official'] = official.ask(cmd='train_step', row=row, common=common, V=s.V, Cvae=s.Cvae,
                                                    step=step_kw)
    finally:
        if official:
            official.close()
    print(f'# device {device}, width {s.width}, heads {s.heads}, pn {"_".join(map(str, s.pn))}, batch {b.batch}, '
          f'VIAR m={s.m}, {"bf16" if s.bf16 else "fp32"}; time = median of {b.steps} steps')
    head = ['model', 'D', 'n', 'm', 'params(M)', 'step ms', 'act MiB', 'peak MiB']
    print(measure.table(head + (['off ms', 'off act', 't ratio', 'act ratio'] if official else []),
                        [step_cells(r) for r in rows], markdown=False))
    return rows


# ---------------------------------------------------------------- loader

def measure_loader(data: str, workers: int, batches: int, batch_size: int, reso: int = 256, warmup: int = 1) -> Dict:
    """Wall-clock and CPU rate of `batches` batches through the training loader with `workers` processes."""

    def children_cpu_s():   # CPU seconds of this process's reaped children (the workers, once they exit)
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    _, train_set, _ = build_datasets(data, reso, round(1.125 * reso), hflip=False)
    loader = DataLoader(train_set, batch_sampler=DistInfiniteBatchSampler(len(train_set), batch_size, seed=0),
                        generator=torch.Generator().manual_seed(0), **loader_kwargs(workers, pin=False))
    cpu0, kids0 = time.process_time(), children_cpu_s()
    it = iter(loader)
    for _ in range(warmup):   # worker start-up and the first batch are not the steady rate
        next(it)
    t0, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, main_cpu = time.perf_counter() - t0, time.process_time() - cpu1
    del it, loader   # persistent workers exit here, so their CPU time reaches RUSAGE_CHILDREN
    n = batches * batch_size
    # workers also made the warm-up and unconsumed prefetched batches: their CPU time is no per-CPU rate (workers=0 is)
    cpu = children_cpu_s() - kids0 + time.process_time() - cpu0 if workers else main_cpu
    return dict(workers=workers, images=n, wall_s=wall, img_per_s=n / wall, cpu_s=cpu,
                img_per_cpu_s=None if workers else n / cpu)


def run_loader(b: BenchArgs, a: LoaderArgs) -> List[Dict]:
    """One row per worker count, and the CPU cores each GPU rate of --gpu_rates needs."""
    with tempfile.TemporaryDirectory(prefix='loader_bench_') as tmp:
        data = a.data_path or make_jpegs(tmp, a.loader_images, tuple(int(t) for t in a.image_size.split('x')))
        print(f'# machine: {measure.machine_line()}; torch threads {torch.get_num_threads()}; {sys.executable}')
        print(f'# loader: {data if a.data_path else f"{a.loader_images} synthetic {a.image_size} JPEGs"}, '
              f'{a.reso} px crops of a {round(1.125 * a.reso)} px LANCZOS resize, batch {b.batch}')
        rows = [measure_loader(data, w, a.loader_batches, b.batch, a.reso) for w in sorted({0, *a.loader_workers})]
    per_core = rows[0]['img_per_cpu_s']
    print(measure.table(['workers', 'images', 'wall s', 'img/s', 'CPU s', 'img per CPU-s', 'vs N x 1 core'], [
        [r['workers'], r['images'], f'{r["wall_s"]:.2f}', f'{r["img_per_s"]:.1f}', f'{r["cpu_s"]:.2f}',
         f'{r["img_per_cpu_s"]:.1f}' if r['img_per_cpu_s'] else '-',
         f'{r["img_per_s"] / (r["workers"] * per_core):.2f}' if r['workers'] else '-'] for r in rows], markdown=False))
    for rate in (float(t) for t in a.gpu_rates.split(',')):
        print(f'# a GPU training {rate:g} img/s needs {rate / per_core:.2f} CPU cores of loading at '
              f'{per_core:.1f} img per CPU-s')
    return rows


# ---------------------------------------------------------------- fsdp_memory

META_MODELS = {   # full-size models of --mode fsdp_memory: VAR-d36 at 512 px with shared AdaLN, VIAR-d30 at 256 px
    'VAR-d36': dict(depth=36, embed_dim=2304, num_heads=36, shared_aln=True, patch_nums=PYRAMIDS[512]),
    'VIAR-d30': dict(depth=30, embed_dim=1920, num_heads=30, use_implicit=True, pre_depth=5, post_depth=5),
}


def build_meta(name: str):
    """A model of META_MODELS on the meta device."""
    with torch.device('meta'):
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
        return build_var(vae, attn_l2_norm=True, **META_MODELS[name])


def meta_rows(names=('VAR-d36', 'VIAR-d30'), worlds=(1, 2, 4, 8, 16, 32, 64)) -> List[Dict]:
    """One row per (model, world size): utils/train/fsdp.py's arithmetic beside the shards dist.fsdp_shard makes in a
    fake process group (rank 0; nothing allocated), and the fp32 root unit, gathered for the whole step."""
    rows = []
    for name in names:
        for world in worlds:
            var = build_meta(name)
            shapes = [tuple(p.shape) for p in var.parameters()]
            in_units = {id(p) for unit in var.fsdp_units() for mod in unit for p in mod.parameters()}
            root = sum(p.numel() for p in var.parameters() if id(p) not in in_units)
            with dist.fake_group(world):
                dist.fsdp_shard(var, var.fsdp_units(), torch.bfloat16, torch.float32)
                got = measured_rank_bytes(var.parameters(), lambda p: dist.local_part(p).numel())
            want = rank_bytes(shapes, world)
            rows.append(dict(model=name, world=world, params=sum(map(math.prod, shapes)), want=want.__dict__,
                             got=got.__dict__, total=want.total, match=want == got, root_fp32=root * 4))
    return rows


def rss_child(f: FsdpArgs):
    """One torchrun worker of --rss: build, shard if several ranks, train; print its peak RSS as JSON."""
    dist.initialize('cpu')
    torch.manual_seed(0)
    base = measure.memory.peak_rss_bytes()
    vae, var = build_vae_var('cpu', patch_nums=(1, 2, 3, 4), V=4096, Cvae=32, ch=32, num_classes=1000,
                             depth=f.rss_depth, embed_dim=f.rss_width, num_heads=f.rss_width // 64, vae_ch_mult=(1, 1),
                             vae_num_res_blocks=1, attn_l2_norm=True)
    var.train()
    if dist.initialized():
        dist.fsdp_shard(var, var.fsdp_units())
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(dist.get_rank())
    idx = [torch.randint(0, 4096, (2, p * p), generator=g) for p in (1, 2, 3, 4)]
    x = vae.quantize.idxBl_to_var_input(idx)
    t0 = time.process_time()
    for _ in range(f.rss_steps):
        F.cross_entropy(var(torch.tensor([1, 2]), x).flatten(0, 1), torch.cat(idx, 1).flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    held = measured_rank_bytes(var.parameters(), lambda p: dist.local_part(p).numel())
    print(json.dumps(dict(rank=dist.get_rank(), world=dist.get_world_size(), peak_rss=measure.memory.peak_rss_bytes(),
                          import_rss=base, held=held.total, params=sum(p.numel() for p in var.parameters()),
                          cpu_s=time.process_time() - t0)), flush=True)
    dist.finalize()


def rss_rows(f: FsdpArgs, mmap_threshold: bool) -> List[Dict]:
    """Each rank's line from a 1-rank and a 2-rank (gloo, --fsdp) torchrun; mmap_threshold returns freed blocks of
    64 KiB+ to the system, so RSS follows live tensors (glibc's default keeps FSDP's freed units in the heap)."""
    rows = []
    for world in (1, 2):
        env = {k: v for k, v in os.environ.items() if k != 'MALLOC_MMAP_THRESHOLD_'}
        env.update(OMP_NUM_THREADS='1', PYTHONPATH=measure.ROOT, VIAR_DIST_TIMEOUT_S='300',
                   **({'MALLOC_MMAP_THRESHOLD_': '65536'} if mmap_threshold else {}))
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}',
               os.path.abspath(__file__), '--mode', 'fsdp_memory', '--rss_child',
               *(f'--{k}={getattr(f, k)}' for k in ('rss_depth', 'rss_width', 'rss_steps'))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=measure.ROOT)
        if proc.returncode != 0:
            raise SystemExit(f'the {world}-rank run failed:\n{proc.stderr[-3000:]}')
        rows += [dict(json.loads(line), malloc='mmap 64K' if mmap_threshold else 'default')
                 for line in proc.stdout.splitlines() if line.startswith('{')]
    return rows


def run_fsdp(b: BenchArgs, f: FsdpArgs) -> Dict:
    """The meta table, and with --rss the measured one."""
    print(f'# machine: {measure.machine_line()}')
    print('# fp32 parameters + gradients + AdamW moments on the fullest rank under FSDP2 (bf16 runs gather bf16 '
          'copies for compute; the sharded state stays fp32)')
    out = dict(meta=meta_rows())
    print(measure.table(['model', 'params', 'ranks', 'params GiB', 'grads GiB', 'AdamW GiB', 'total GiB',
                         'root fp32 GiB', 'meta shards = arithmetic'],
                        [[r['model'], f'{r["params"]:,d}', r['world']] + [f'{v / GiB:.3f}' for v in (
                            r['want']['params'], r['want']['grads'], r['want']['optim'], r['total'], r['root_fp32'])]
                         + [r['match']] for r in out['meta']], markdown=False))
    if f.rss:
        print(f'# peak RSS, CPU, VAR depth {f.rss_depth} width {f.rss_width}, scales 1..4, batch 2 per rank, '
              f'{f.rss_steps} AdamW steps; 1 rank unsharded, 2 ranks --fsdp (gloo); "held" = fp32 params + '
              f'grads + AdamW on the rank')
        out['rss'] = [r for thr in (False, True) for r in rss_rows(f, thr)]
        print(measure.table(['malloc', 'ranks', 'rank', 'params', 'held MiB', 'peak RSS MiB', 'RSS after imports',
                             'RSS growth MiB'],
                            [[r['malloc'], r['world'], r['rank'], f'{r["params"]:,d}'] + [f'{v / MiB:.1f}' for v in (
                                r['held'], r['peak_rss'], r['import_rss'], r['peak_rss'] - r['import_rss'])]
                             for r in out['rss']], markdown=False))
    return out


# ---------------------------------------------------------------- token_cache

TOKEN_CONFIGS = {   # (ModelSpec of a VIAR, its S-JFB ranges, batch, synthetic images: side, count)
    'demo': (dict(patch_nums=(1, 2, 3, 4), V=128, Cvae=16, vae_ch=32, vae_ch_mult=(1, 2, 4), vae_num_res_blocks=1,
                  num_classes=10), dict(jfb_no_grad=(0, 4), jfb_with_grad=(1, 4)), 64, 8, 128),
    'official256': (dict(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, vae_ch=160,
                         vae_ch_mult=(1, 1, 2, 2, 4), vae_num_res_blocks=2, num_classes=4),
                    dict(jfb_no_grad=(2, 2), jfb_with_grad=(1, 1)), 8, 500, 16),
}


def token_cache_row(name: str, b: BenchArgs, t: TokenCacheArgs, work: str) -> Dict[str, Any]:
    """One config: write its cache, then alternate image and cached steps of one trainer; medians."""
    arch, jfb, B, side, n_images = TOKEN_CONFIGS[name]
    demo_weights = bool(name == 'demo' and t.demo_vae)
    spec = ModelSpec(depth=6, use_implicit=True, pre_depth=1, post_depth=1, embed_dim=96 if name == 'demo' else 128,
                     num_heads=4, **arch)
    torch.manual_seed(0)
    vae, var = spec.build('cpu', **jfb)
    vae_path = t.demo_vae if demo_weights else os.path.join(work, f'{name}_vae.pth')
    if demo_weights:
        load_vae_weights(vae, vae_path)
    else:   # random weights, saved for the extractor
        save_atomic(vae.state_dict(), vae_path)
    if name == 'demo' and t.demo_data:
        data, mid = t.demo_data, 1.0
    else:
        size = (side, side * 3 // 4 if side > 64 else side)
        data, mid = make_jpegs(os.path.join(work, f'{name}_imgs'), n_images, size, spec.num_classes), 1.125
    cache, t0 = os.path.join(work, f'{name}_cache'), time.perf_counter()
    extract(['--data_path', data, '--out', cache, '--vae_ckpt', vae_path, '--pn', '_'.join(map(str, spec.patch_nums)),
             '--mid_reso', str(mid), '--batch_size', str(B), '--device', 'cpu', '--progress', 'False'])
    t_extract, man = time.perf_counter() - t0, open_cache(cache)
    vae.eval().requires_grad_(False)
    var.train()
    _, params, groups = param_groups(var)
    tr = VARTrainer(vae, var, var, AmpOptimizer(build_adamw(groups, 1e-4, torch.device('cpu')), params), seed=0)
    _, train_set, _ = build_datasets(data, spec.image_px, round(mid * spec.image_px))
    loaders = dict(images=DataLoader(train_set, batch_sampler=DistInfiniteBatchSampler(len(train_set), B, seed=0)),
                   cache=DataLoader(TokenShards(cache, man, 'train'),
                                    batch_sampler=CacheBatchSampler(len(train_set), B, seed=0)))
    loaders = {k: iter(v) for k, v in loaders.items()}
    step_s, data_s = {k: [] for k in loaders}, {k: [] for k in loaders}
    for i in range(b.warmup + b.steps):
        for kind, loader in loaders.items():
            t0 = time.perf_counter()
            x, y = next(loader)
            t1 = time.perf_counter()
            tr.train_step(x, y, g_it=i, stepping=True)
            if i >= b.warmup:
                step_s[kind].append(time.perf_counter() - t0)
                data_s[kind].append(t1 - t0)
    med = {f'{what}_s_{k}': statistics.median(v) for what, d in (('step', step_s), ('data', data_s))
           for k, v in d.items()}
    splits = man['splits']
    return dict(config=name, resolution=spec.image_px, tokens=var.L, batch=B,
                var_params=sum(p.numel() for p in var.parameters()),
                vae_params=sum(p.numel() for p in vae.parameters()),
                **med, ratio=med['step_s_images'] / med['step_s_cache'],
                extract_s_per_image=t_extract / (splits['train']['images'] + splits['val']['images']),
                cache_bytes_per_image=os.path.getsize(os.path.join(cache, 'train-00000.tokens.npy'))
                / splits['train']['shards'][0]['images'], demo_weights=demo_weights)


def run_token_cache(b: BenchArgs, t: TokenCacheArgs) -> Dict[str, Any]:
    """Every config of --configs, one line each, and the machine before and after."""
    before, rows = measure.machine_facts(), []
    with tempfile.TemporaryDirectory() as work:
        for name in t.configs.split(','):
            rows.append(r := token_cache_row(name, b, t, work))
            print(f"{name}: {r['resolution']} px, L {r['tokens']}, batch {r['batch']}, "
                  f"VIAR {r['var_params'] / 1e6:.2f}M; "
                  f"step {r['step_s_images']:.3f} s from images ({r['data_s_images']:.3f} s loading) vs "
                  f"{r['step_s_cache']:.3f} s from the cache ({r['data_s_cache']:.4f} s loading): "
                  f"{r['ratio']:.2f}x; writing the cache {r['extract_s_per_image'] * 1000:.1f} ms/image, "
                  f"{r['cache_bytes_per_image'] / 1024:.2f} KiB/image", flush=True)
    print(f"# machine: {measure.machine_line()}; {b.threads} thread(s); load average {before['load_avg'][0]:.2f} "
          f"at the start")
    return dict(machine=before, load_avg_after=measure.machine_facts()['load_avg'], threads=b.threads, steps=b.steps,
                rows=rows, torch=torch.__version__)


def main(argv=None):
    """Run the chosen mode; its rows go to --json too."""
    b, g = parse_args(argv)
    if g[FsdpArgs].rss_child:
        return rss_child(g[FsdpArgs])
    if b.threads:
        torch.set_num_threads(b.threads)
    run, group = dict(steps=(run_steps, StepArgs), loader=(run_loader, LoaderArgs), fsdp_memory=(run_fsdp, FsdpArgs),
                      token_cache=(run_token_cache, TokenCacheArgs))[b.mode]
    rows = run(b, g[group])
    if b.json:
        write_json_atomic(rows, b.json, indent=1)
    return rows


if __name__ == '__main__':
    main()
