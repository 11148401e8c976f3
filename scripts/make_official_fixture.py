"""Write tests/data/official_tiny.pt: outputs of the OFFICIAL VIAR code on tiny random weights.

    python scripts/make_official_fixture.py /path/to/official/VIAR   # a checkout of mobiushy/VIAR

The official checkout is imported from PATH in this process only (both packages are called `models`,
so nothing of this project is imported here); it is never part of the project and no test needs it:
the tests read the file this writes. For VAR and VIAR (depth 4, width 16, 2 heads, pre/post 1/1,
V 48, Cvae 8, patch_nums 1..4, 5 classes) it stores the transformer's state dict, the quantizer's
state dict (the only tokenizer part next-scale sampling reads besides the final decode), and what the
official code computes from them: the teacher-forced logits (VIAR with n = 2 no-grad and m = 1
iterations) and the token maps `autoregressive_infer_cfg` samples at every scale, greedy and with
top-k/top-p, for the official iteration knobs (3,3), (4,2), (1,8).
tests/test_official_fixture.py loads all of it into this project's models and compares.
"""
import os
import subprocess
import sys

SIZES = dict(depth=4, embed_dim=16, num_heads=2, pre_depth=1, post_depth=1, V=48, Cvae=8, patch_nums=(1, 2, 3, 4),
             num_classes=5)
KNOBS = [(3, 3), (4, 2), (1, 8)]
SAMPLERS = {'greedy': dict(top_k=1, top_p=0.0), 'topk_topp': dict(top_k=10, top_p=0.9)}
LABELS_TRAIN, LABELS_SAMPLE, G_SEED, CFG = [1, 3], [0, 4], 5, 1.5
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'data', 'official_tiny.pt')


def official_models(use_implicit: bool, seed: int):
    """The official VQVAE (its fixed layout, ch 32) and VAR/VIAR with every parameter ~ N(0, 0.3^2)."""
    import torch
    from models.var import VAR
    from models.vqvae import VQVAE
    s = SIZES
    vae = VQVAE(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=s['patch_nums'])
    var = VAR(vae_local=vae, num_classes=s['num_classes'], depth=s['depth'], embed_dim=s['embed_dim'],
              num_heads=s['num_heads'], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6,
              shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=s['patch_nums'],
              use_implicit=use_implicit, pre_depth=s['pre_depth'], post_depth=s['post_depth'])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(vae.quantize.parameters()) + list(var.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return vae.eval(), var.eval()


def record(use_implicit: bool) -> dict:
    import torch
    vae, var = official_models(use_implicit, seed=10 + use_implicit)
    var.cond_drop_rate = 0.0
    g = torch.Generator().manual_seed(20 + use_implicit)
    idx_Bl = [torch.randint(0, SIZES['V'], (len(LABELS_TRAIN), pn * pn), generator=g) for pn in SIZES['patch_nums']]
    if use_implicit:   # the official trainer draws n and m; fixed here so the fixture is one forward
        var.implicit_no_grad_min_iters = var.implicit_no_grad_max_iters = 2
        var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = 1
    out = dict(var_sd=var.state_dict(), quant_sd=vae.quantize.state_dict(), idx_Bl=idx_Bl, samples={})
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(idx_Bl)
        out.update(x_BLCv=x, logits_BLV=var(torch.tensor(LABELS_TRAIN), x))
        for name, kw in SAMPLERS.items():
            for left, right in KNOBS:
                toks = []
                hook = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
                var.autoregressive_infer_cfg(len(LABELS_SAMPLE), torch.tensor(LABELS_SAMPLE), g_seed=G_SEED, cfg=CFG,
                                             iter_left=left, iter_right=right, **kw)
                hook.remove()
                out['samples'][(name, left, right)] = toks
    return out


def main():
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], 'models')):
        raise SystemExit('usage: make_official_fixture.py PATH  (PATH: a checkout of the official VIAR code)')
    official = os.path.abspath(sys.argv[1])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [official] + [p for p in sys.path if p and os.path.abspath(p) not in (here, os.getcwd())]
    import torch
    torch.set_num_threads(1)
    try:
        commit = subprocess.run(['git', '-C', official, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ''
    fixture = dict(meta=dict(official_commit=commit or 'unknown', torch=str(torch.__version__), sizes=SIZES, knobs=KNOBS,
                             samplers=SAMPLERS, labels_train=LABELS_TRAIN, labels_sample=LABELS_SAMPLE, g_seed=G_SEED,
                             cfg=CFG),
                   var=record(False), viar=record(True))
    tmp = OUT + '.tmp'
    torch.save(fixture, tmp)
    os.replace(tmp, OUT)
    print(f'wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB) from the official code at {commit or "?"}')


if __name__ == '__main__':
    main()
