"""`python bench/official_runner.py PATH`: the child that runs the official code of `--official PATH` with PATH first
on sys.path and the project off it (both packages are called `models`), answering the `measure.serve` commands.
"""
import os
import sys

import torch

import measure   # bench/ is sys.path[0] when this file runs as a script; measure imports nothing of the project


def kv_bytes_probe(var, held: dict) -> None:
    """Forward hooks recording in `held` each official attention layer's KV-cache bytes (cleared before each call)."""

    def nbytes(x):
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

    def hook(m, args, out):
        held[id(m)] = nbytes(m.cached_k) + nbytes(m.cached_v)

    for m in var.modules():
        if hasattr(m, 'kv_caching'):
            m.register_forward_hook(hook)


def build_sampler(msg, held: dict):
    """A sampling child's (device, vae, call) with the official models; each call's KV-cache bytes go to `held`."""
    from models.var import VAR          # the official package, first on sys.path
    from models.vqvae import VQVAE
    device, m, sch = torch.device(msg['device']), msg['model'], msg['schedule']
    if tuple(m['vae_ch_mult']) != (1, 1, 2, 2, 4) or m['vae_num_res_blocks'] != 2:
        raise ValueError('the official VQVAE has a fixed layout (ch_mult 1,1,2,2,4, 2 res blocks)')
    if sch.get('tau') is not None:
        raise ValueError('the official sampler has no adaptive schedule')
    if not sch.get('knob'):
        raise ValueError(f'schedule {sch["name"]} is not an (iter_left, iter_right) knob; the official sampler '
                         f'takes only those two numbers')
    left, right = sch['knob']
    schedules = measure.load_project_module('viar_project_schedules', os.path.join('models', 'schedules.py'))
    counts = schedules.official_iters(left, right, len(m['patch_nums']))
    if counts != list(sch['counts']):
        raise ValueError(f'schedule counts {sch["counts"]} are not what the official knob runs ({counts})')
    vae = VQVAE(vocab_size=m['V'], z_channels=m['Cvae'], ch=m['vae_ch'], test_mode=True, share_quant_resi=4,
                v_patch_nums=tuple(m['patch_nums'])).to(device)
    var = VAR(vae_local=vae, num_classes=m['num_classes'], depth=m['depth'], num_heads=m['num_heads'] or m['depth'],
              embed_dim=m['embed_dim'] or 64 * m['depth'], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
              norm_eps=1e-6, shared_aln=m['shared_aln'], cond_drop_rate=0.1, attn_l2_norm=m['attn_l2_norm'],
              patch_nums=tuple(m['patch_nums']), use_implicit=m['use_implicit'], pre_depth=m['pre_depth'],
              post_depth=m['post_depth']).to(device)
    # the project's one loader (weights only), loaded by path: the official package owns `utils` here
    ckpt = measure.load_project_module('viar_project_checkpoint', os.path.join('utils', 'checkpoint.py'))
    sd = ckpt.read_checkpoint(msg['state_path'])
    vae.load_state_dict(sd.pop('vae'), strict=True)
    var.load_state_dict(sd.pop('var'), strict=True)
    vae.eval(), var.eval()
    kv_bytes_probe(var, held)
    label_B = torch.arange(msg['B'], device=device) % m['num_classes']
    kw = dict(g_seed=msg['g_seed'], cfg=msg['cfg'], top_k=msg['top_k'], top_p=msg['top_p'], iter_left=left,
              iter_right=right)
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[msg['dtype']]

    def call():
        held.clear()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return var.autoregressive_infer_cfg(msg['B'], label_B, **kw)
    return device, vae, call


def train_step(msg):
    """One row of `train_speed.py --official`: the official VAR/VIAR built as the project's row is."""
    from models.var import VAR
    from models.vqvae import VQVAE
    row, common = msg['row'], dict(msg['common'], patch_nums=tuple(msg['common']['patch_nums']))
    n, m = row['n'], max(row['m'], 1)
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=msg['V'], z_channels=msg['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=common['patch_nums'])
    var = VAR(vae_local=vae, flash_if_available=False, fused_if_available=False, use_implicit=row['model'] == 'viar',
              pre_depth=1, post_depth=1, implicit_no_grad_min_iters=n, implicit_no_grad_max_iters=n,
              implicit_with_grad_min_iters=m, implicit_with_grad_max_iters=m, **common)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    return measure.train_step_row(var, vae, var, **msg['step'])


def main():
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], 'models')):
        raise SystemExit('usage: official_runner.py PATH  (PATH: a checkout of the official VIAR code, with models/)')
    mine = (measure.ROOT, os.path.dirname(os.path.abspath(__file__)), os.getcwd())
    sys.path[:] = [os.path.abspath(sys.argv[1])] + [p for p in sys.path if p and os.path.abspath(p) not in mine]
    held = {}
    sampling = measure.sampling_handlers(lambda msg: build_sampler(msg, held),
                                         describe=lambda img: (img, sum(held.values()), None))
    measure.serve(dict(sampling, train_step=train_step))


if __name__ == '__main__':
    main()
