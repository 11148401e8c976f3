"""Training step time with and without the token cache (a benchmark, not a test).

For each config, one trainer and one model; the image step (load a batch of image files, resize and crop,
VQVAE encoder, forward/backward/AdamW) and the cached step (read the batch's token rows from the shards,
forward/backward/AdamW) alternate, so both see the same machine load; the median of each and their ratio
are printed, with the time to write the cache (per image) and the machine.

  demo         the demo's tokenizer (16 px digits, ch 32, ch_mult 1,2,4; --demo_vae, else random weights)
               and its VIAR (width 96, 1 pre + implicit + 1 post, S-JFB n <= 4, m <= 4), batch 64
  official256  the official tokenizer architecture (ch 160, ch_mult 1,1,2,2,4, two res blocks, V 4096,
               Cvae 32) with random weights at 256 px on JPEGs of ImageNet's typical size (500x375),
               and a small VIAR (width 128, 4 heads, 1 pre + implicit + 1 post, n = 2, m = 1), batch 8

    python bench/token_cache_speed.py --configs demo,official256 --demo_vae /work/demo_own/vae/vae.pth \
        --threads 1 --steps 5 --json docs/training/token_cache_speed.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = {
    'demo': dict(pn=(1, 2, 3, 4), V=128, Cvae=16, vae_ch=32, vae_ch_mult=(1, 2, 4), vae_num_res_blocks=1,
                 width=96, heads=4, depth=6, p=1, jfb_n=(0, 4), jfb_m=(1, 4), batch=64, img_side=8, n_images=128,
                 classes=10),
    'official256': dict(pn=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, vae_ch=160, vae_ch_mult=(1, 1, 2, 2, 4),
                        vae_num_res_blocks=2, width=128, heads=4, depth=6, p=1, jfb_n=(2, 2), jfb_m=(1, 1), batch=8,
                        img_side=500, n_images=16, classes=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--configs', default='demo,official256')
    p.add_argument('--demo_vae', default='', help="the demo's tokenizer (DEMO_OUT/vae/vae.pth); random weights if empty")
    p.add_argument('--demo_data', default='', help="the demo's digit folder (DEMO_OUT/digits); synthetic if empty")
    p.add_argument('--steps', type=int, default=6, help='timed steps of each kind')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', default='')
    return p.parse_args(argv)


def synthetic_folder(root: str, n: int, classes: int, w: int, h: int) -> str:
    """train/ and val/ class folders of noisy JPEGs (w x h), as a stand-in for real photos."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (('train', n), ('val', max(1, n // 8))):
        for i in range(count):
            d = os.path.join(root, split, f'c{i % classes}')
            os.makedirs(d, exist_ok=True)
            base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            img.save(os.path.join(d, f'{i}.jpg'), quality=90)
    return root


def build(cfg: Dict[str, Any], vae_path: str):
    """(vae, var, trainer) for a config; the VQVAE weights from vae_path."""
    import torch
    from models.config import ModelSpec
    from trainer import VARTrainer
    from utils.checkpoint import load_vae_weights
    from utils.train.amp_opt import AmpOptimizer, build_adamw
    from utils.train.lr_control import param_groups
    spec = ModelSpec(depth=cfg['depth'], use_implicit=True, pre_depth=cfg['p'], post_depth=cfg['p'],
                     embed_dim=cfg['width'], num_heads=cfg['heads'], patch_nums=cfg['pn'], V=cfg['V'], Cvae=cfg['Cvae'],
                     vae_ch=cfg['vae_ch'], vae_ch_mult=cfg['vae_ch_mult'], vae_num_res_blocks=cfg['vae_num_res_blocks'],
                     num_classes=cfg['classes'])
    torch.manual_seed(0)
    vae, var = spec.build('cpu', jfb_no_grad=cfg['jfb_n'], jfb_with_grad=cfg['jfb_m'])
    load_vae_weights(vae, vae_path)
    vae.eval().requires_grad_(False)
    var.train()
    _, params, groups = param_groups(var)
    opt = AmpOptimizer(build_adamw(groups, 1e-4, torch.device('cpu')), params)
    return vae, var, VARTrainer(vae, var, var, opt, seed=0), spec


def run_config(name: str, a: argparse.Namespace, work: str) -> Dict[str, Any]:
    import torch
    from models.vqvae import VQVAE
    from scripts.extract_tokens import main as extract
    from utils.checkpoint import save_atomic
    from utils.data.datasets import build_datasets
    from utils.data.sampler import DistInfiniteBatchSampler
    from utils.data.token_cache import CacheBatchSampler, TokenShards, open_cache
    from torch.utils.data import DataLoader
    cfg = CONFIGS[name]
    res = cfg['pn'][-1] * 2 ** (len(cfg['vae_ch_mult']) - 1)
    if name == 'demo' and a.demo_vae:
        vae_path = a.demo_vae
    else:
        torch.manual_seed(0)
        vae = VQVAE(vocab_size=cfg['V'], z_channels=cfg['Cvae'], ch=cfg['vae_ch'], test_mode=True, share_quant_resi=4,
                    v_patch_nums=cfg['pn'], ch_mult=cfg['vae_ch_mult'], num_res_blocks=cfg['vae_num_res_blocks'])
        vae_path = os.path.join(work, f'{name}_vae.pth')
        save_atomic(vae.state_dict(), vae_path)
    if name == 'demo' and a.demo_data:
        data, mid = a.demo_data, 1.0
    else:
        side = cfg['img_side']
        data = synthetic_folder(os.path.join(work, f'{name}_imgs'), cfg['n_images'], cfg['classes'], side,
                                side * 3 // 4 if side > 64 else side)
        mid = 1.125
    cache = os.path.join(work, f'{name}_cache')
    t0 = time.perf_counter()
    extract(['--data_path', data, '--out', cache, '--vae_ckpt', vae_path, '--pn', '_'.join(map(str, cfg['pn'])),
             '--mid_reso', str(mid), '--batch_size', str(cfg['batch']), '--device', 'cpu', '--progress', 'False'])
    t_extract = time.perf_counter() - t0
    man = open_cache(cache)
    n_imgs = man['splits']['train']['images'] + man['splits']['val']['images']
    vae, var, tr, spec = build(cfg, vae_path)
    _, train_set, _ = build_datasets(data, res, round(mid * res))
    B = cfg['batch']
    img_loader = iter(DataLoader(train_set, batch_sampler=DistInfiniteBatchSampler(len(train_set), B, seed=0)))
    tok_loader = iter(DataLoader(TokenShards(cache, man, 'train'), batch_sampler=CacheBatchSampler(len(train_set), B,
                                                                                                  seed=0)))
    times = {'images': [], 'cache': []}
    data_t = {'images': [], 'cache': []}
    for i in range(a.warmup + a.steps):
        for kind, loader in (('images', img_loader), ('cache', tok_loader)):
            t0 = time.perf_counter()
            x, y = next(loader)
            t1 = time.perf_counter()
            tr.train_step(x, y, g_it=i, stepping=True)
            t2 = time.perf_counter()
            if i >= a.warmup:
                times[kind].append(t2 - t0)
                data_t[kind].append(t1 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_data = {k: statistics.median(v) for k, v in data_t.items()}
    n_params = sum(p.numel() for p in var.parameters())
    return dict(config=name, resolution=res, tokens=var.L, batch=B, var_params=n_params,
                vae_params=sum(p.numel() for p in vae.parameters()), step_s_images=med['images'],
                step_s_cache=med['cache'], data_s_images=med_data['images'], data_s_cache=med_data['cache'],
                ratio=med['images'] / med['cache'], extract_s_per_image=t_extract / n_imgs,
                cache_bytes_per_image=os.path.getsize(os.path.join(cache, 'train-00000.tokens.npy')) /
                man['splits']['train']['shards'][0]['images'], demo_weights=bool(name == 'demo' and a.demo_vae))


def main(argv=None):
    a = parse_args(argv)
    import torch
    from bench.sample_speed import machine_facts
    torch.set_num_threads(a.threads)
    before = machine_facts()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for name in a.configs.split(','):
            rows.append(run_config(name, a, work))
            r = rows[-1]
            print(f"{name}: {r['resolution']} px, L {r['tokens']}, batch {r['batch']}, VIAR {r['var_params'] / 1e6:.2f}M; "
                  f"step {r['step_s_images']:.3f} s from images ({r['data_s_images']:.3f} s loading) vs "
                  f"{r['step_s_cache']:.3f} s from the cache ({r['data_s_cache']:.4f} s loading): "
                  f"{r['ratio']:.2f}x; writing the cache {r['extract_s_per_image'] * 1000:.1f} ms/image, "
                  f"{r['cache_bytes_per_image'] / 1024:.2f} KiB/image", flush=True)
    after = machine_facts()
    out = dict(machine=before, load_avg_after=after['load_avg'], threads=a.threads, steps=a.steps, rows=rows,
               torch=torch.__version__)
    print(f"machine: {before['cpu']}; avx2 {before['avx2']}, avx512_bf16 {before['avx512_bf16']}, amx {before['amx']}; "
          f"{a.threads} thread(s); load average {before['load_avg']} before, {after['load_avg']} after")
    if a.json:
        from utils.atomic import write_json_atomic
        write_json_atomic(out, a.json)
    return out


if __name__ == '__main__':
    main()
