"""Training step time and memory of VAR and VIAR over effective depth (a benchmark, not a test).

Effective depth D: VAR has D blocks; VIAR has 1 pre-block, n = D - 2 - m implicit iterations without grad,
m with grad, 1 post-block. Each row: median time of one AdamW training step (forward, CE, backward, step)
on random tokens, the bytes autograd saves for backward (parameters excluded), and on CUDA the peak
allocated memory. `--official PATH` runs the same configs with the official models imported from PATH
(e.g. a mobiushy/VIAR checkout) in a separate process and prints our/official ratios.

    python bench/train_speed.py --width 128 --depths 4,8,12,16 --official /path/to/VIAR
    python bench/train_speed.py --loader [--data_path DIR] --loader_workers 0,2   # the data loader alone (bench/loader_speed.py)
    python bench/train_speed.py --fsdp [--rss]    # memory per rank under --fsdp (bench/fsdp_memory.py)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    """Benchmark flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--width', type=int, default=128)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--pn', type=str, default='1_2_3_4_5_6', help="token-map sides, '_'-separated")
    p.add_argument('--V', type=int, default=512)
    p.add_argument('--Cvae', type=int, default=16)
    p.add_argument('--num_classes', type=int, default=10)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--depths', type=str, default='4,8,12,16', help='effective depths')
    p.add_argument('--m', type=int, default=2, help='VIAR iterations with grad')
    p.add_argument('--steps', type=int, default=5, help='timed steps per config')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', type=str, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA)')
    p.add_argument('--models', type=str, default='var,viar')
    p.add_argument('--official', type=str, default='', help='path of an official VIAR checkout to compare with')
    p.add_argument('--json', type=str, default='', help='also write the rows here')
    p.add_argument('--impl', type=str, default='ours', choices=('ours', 'official'), help=argparse.SUPPRESS)
    g = p.add_argument_group('--loader: the training data loader alone (bench/loader_speed.py)')
    g.add_argument('--loader', action='store_true', help='measure the loader instead of training steps')
    g.add_argument('--data_path', type=str, default='', help='class folders of JPEGs (default: synthetic ones)')
    g.add_argument('--loader_images', type=int, default=64, help='synthetic JPEGs to make')
    g.add_argument('--image_size', type=str, default='500x375', help='synthetic JPEG size, WxH')
    g.add_argument('--reso', type=int, default=256, help='training resolution (crop side)')
    g.add_argument('--loader_workers', type=str, default='0,2', help='worker counts to measure (0 always)')
    g.add_argument('--loader_batches', type=int, default=8, help='timed batches per worker count')
    g.add_argument('--gpu_rates', type=str, default='74,150,300', help='GPU training rates (img/s) to size CPUs for')
    g = p.add_argument_group('--fsdp: memory per rank under train.py --fsdp (bench/fsdp_memory.py)')
    g.add_argument('--fsdp', action='store_true', help='params + grads + AdamW bytes per rank, VAR-d36 and VIAR-d30')
    g.add_argument('--rss', action='store_true', help='also measure peak RSS of a small model at 1 and 2 ranks')
    g.add_argument('--rss_depth', type=int, default=12)
    g.add_argument('--rss_width', type=int, default=768)
    g.add_argument('--rss_steps', type=int, default=3)
    return p.parse_args(argv)


def configs(args) -> List[Dict]:
    """(model, effective depth, n, m) rows; VIAR rows need D >= m + 2."""
    rows = []
    for D in (int(d) for d in args.depths.split(',')):
        for kind in args.models.split(','):
            if kind == 'var':
                rows.append(dict(model='var', eff_depth=D, n=0, m=0))
            elif D - 2 - args.m >= 0:
                rows.append(dict(model='viar', eff_depth=D, n=D - 2 - args.m, m=args.m))
    return rows


def build(args, row, patch_nums):
    """(var, vae, forward(label, x) -> logits) for a row, from our models or the official ones."""
    use_implicit = row['model'] == 'viar'
    common = dict(num_classes=args.num_classes, depth=max(row['eff_depth'], 3), embed_dim=args.width,
                  num_heads=args.heads, drop_path_rate=0.0, attn_l2_norm=True, patch_nums=patch_nums)
    if args.impl == 'official':
        from models import VAR as OfficialVAR, VQVAE as OfficialVQVAE   # resolved from --official PATH
        vae = OfficialVQVAE(vocab_size=args.V, z_channels=args.Cvae, ch=32, test_mode=True, share_quant_resi=4,
                            v_patch_nums=patch_nums)
        n, m = row['n'], row['m']
        var = OfficialVAR(vae_local=vae, flash_if_available=False, fused_if_available=False, use_implicit=use_implicit,
                          pre_depth=1, post_depth=1, implicit_no_grad_min_iters=n, implicit_no_grad_max_iters=n,
                          implicit_with_grad_min_iters=max(m, 1), implicit_with_grad_max_iters=max(m, 1), **common)
        forward = var
    else:
        from models import VQVAE, build_var
        vae = VQVAE(vocab_size=args.V, z_channels=args.Cvae, ch=32, test_mode=True, share_quant_resi=4,
                    v_patch_nums=patch_nums, ch_mult=(1, 2), num_res_blocks=1)
        var = build_var(vae, use_implicit=use_implicit, pre_depth=1, post_depth=1, **common)

        def forward(label_B, x_BLCv):
            return var(label_B, x_BLCv, jfb_iters=(row['n'], row['m']))
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    return var, vae, forward


def saved_bytes(forward, var, label_B, x_BLCv) -> int:
    """Bytes autograd keeps for backward in one forward (parameter storages excluded, each storage once)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/measure.py, on both sides
    import measure as bench_measure   # loads utils/memory.py by path, so the official child can use it too
    return bench_measure.memory.saved_activation_bytes(lambda: forward(label_B, x_BLCv), var.parameters())


def measure(args) -> List[Dict]:
    """Run every config with the implementation chosen by --impl."""
    if args.impl == 'official':
        sys.path.insert(0, os.path.abspath(args.official))
        os.chdir(os.path.abspath(args.official))
    else:
        sys.path.insert(0, ROOT)
    dev = torch.device(args.device)
    patch_nums = tuple(int(t) for t in args.pn.split('_'))
    out = []
    for row in configs(args):
        torch.manual_seed(0)
        var, vae, forward = build(args, row, patch_nums)
        var.to(dev).train()
        vae.to(dev)
        g = torch.Generator().manual_seed(0)
        idx_Bl = [torch.randint(0, args.V, (args.batch, p * p), generator=g).to(dev) for p in patch_nums]
        x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
        gt_BL = torch.cat(idx_Bl, 1)
        label_B = torch.arange(args.batch, device=dev) % args.num_classes
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95))
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)
        act = saved_bytes(forward, var, label_B, x_BLCv)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with amp:
                logits_BLV = forward(label_B, x_BLCv)
            loss = F.cross_entropy(logits_BLV.float().reshape(-1, args.V), gt_BL.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == 'cuda' else None
        out.append(dict(row, impl=args.impl, params_m=sum(p.numel() for p in var.parameters()) / 1e6,
                        step_ms=1000 * statistics.median(times), saved_act_mib=act / 2 ** 20, peak_mib=peak))
        del var, vae, opt
    return out


def run_official(args) -> List[Dict]:
    """The same configs with the official models, in a child process (their `models`/`dist` shadow ours)."""
    argv = [sys.executable, os.path.abspath(__file__), '--impl', 'official']
    for k, v in vars(args).items():
        if k in ('impl', 'json') or v is False:
            continue
        argv += [f'--{k}'] if v is True else [f'--{k}', str(v)]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.official))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'the official run failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Print a table (and optional JSON) of our rows, with official ratios when --official is given."""
    args = parse_args(argv)
    if args.loader or args.fsdp:
        sys.path.insert(0, ROOT)
        from bench import fsdp_memory, loader_speed
        rows = (loader_speed if args.loader else fsdp_memory).run(args)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(rows, f, indent=1)
        return
    if args.official and not os.path.isdir(os.path.join(args.official, 'models')):
        raise SystemExit(f'--official {args.official}: expected a VIAR checkout with a models/ folder')
    rows = measure(args)
    if args.impl == 'official':   # child process: rows as one JSON line
        print(json.dumps(rows))
        return
    official = {(r['model'], r['eff_depth']): r for r in run_official(args)} if args.official else {}
    print(f'# device {args.device}, width {args.width}, heads {args.heads}, pn {args.pn}, batch {args.batch}, '
          f'VIAR m={args.m}, {"bf16" if args.bf16 else "fp32"}; time = median of {args.steps} steps')
    head = f'{"model":5s} {"D":>3s} {"n":>3s} {"m":>2s} {"params(M)":>9s} {"step ms":>8s} {"act MiB":>8s} {"peak MiB":>9s}'
    if official:
        head += f' {"off ms":>8s} {"off act":>8s} {"t ratio":>7s} {"act ratio":>9s}'
    print(head)
    for r in rows:
        peak = f'{r["peak_mib"]:9.1f}' if r['peak_mib'] is not None else f'{"-":>9s}'
        line = (f'{r["model"]:5s} {r["eff_depth"]:3d} {r["n"]:3d} {r["m"]:2d} {r["params_m"]:9.3f} '
                f'{r["step_ms"]:8.1f} {r["saved_act_mib"]:8.2f} {peak}')
        o = official.get((r['model'], r['eff_depth']))
        if o:
            line += (f' {o["step_ms"]:8.1f} {o["saved_act_mib"]:8.2f} {r["step_ms"] / o["step_ms"]:7.2f} '
                     f'{r["saved_act_mib"] / max(o["saved_act_mib"], 1e-9):9.2f}')
            r['official'] = o
        print(line)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
