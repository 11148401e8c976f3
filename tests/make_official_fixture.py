"""Write tests/data/official_tiny*.pt, official_var_d36_keys.json and official_varhf_tiny/: outputs of the OFFICIAL
VIAR code.

    python tests/make_official_fixture.py /path/to/official/VIAR   # a checkout of mobiushy/VIAR
    python tests/make_official_fixture.py /path/to/official/VIAR --config tiny_saln512
    python tests/make_official_fixture.py /path/to/official/VIAR --keys var_d36
    python tests/make_official_fixture.py /path/to/official/VIAR --varhf   # after official_tiny.pt

The official code is imported from a patched temporary copy of PATH, in this process only (both projects call
their package `models`, so nothing of this project is imported here); no test needs it, the tests read the files
this writes. For VAR and VIAR on tiny random weights (SIZES) a fixture holds the transformer's and the quantizer's
state dicts and what the official code computes from them: the teacher-forced logits (VIAR with n = 2 no-grad and
m = 1 iterations) and the token maps `autoregressive_infer_cfg` samples at every scale, greedy and with
top-k/top-p, for the iteration knobs KNOBS. Every output is recorded in float32 and, under `fp64`, in float64:
tests/official_fp64.patch turns the official code's four float32 casts into casts that keep float64, and float64
results agree across CPUs far below any real difference (tests/test_official_fixture.py).
`--config tiny_saln512`: the same for shared-AdaLN models on the 512 px pyramid (L = 2240) in
official_tiny_saln512.pt. `--keys var_d36`: VAR-d36-s's state-dict keys, shapes and parameter count, built on the
CPU without initialising its weights (tests/test_512.py). `--varhf`: the folder the official
`VARHF.save_pretrained` writes for official_tiny.pt's VAR weights (the official VARHF builds VARs only; it saves no
tokenizer weights), which tests/test_hub_loading.py loads to draw the fixture's tokens.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn

SIZES = dict(depth=4, embed_dim=16, num_heads=2, pre_depth=1, post_depth=1, V=48, Cvae=8, patch_nums=(1, 2, 3, 4),
             num_classes=5)
KNOBS = [(3, 3), (4, 2), (1, 8)]
SAMPLERS = {'greedy': dict(top_k=1, top_p=0.0), 'topk_topp': dict(top_k=10, top_p=0.9)}
LABELS_TRAIN, LABELS_SAMPLE, G_SEED, CFG = [1, 3], [0, 4], 5, 1.5
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, 'data')
FP64_PATCH = os.path.join(HERE, 'official_fp64.patch')
PYRAMID_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# name -> (sizes, shared AdaLN, output file)
CONFIGS = {'tiny': (SIZES, False, os.path.join(DATA, 'official_tiny.pt')),
           'tiny_saln512': (dict(SIZES, patch_nums=PYRAMID_512), True, os.path.join(DATA, 'official_tiny_saln512.pt'))}
# name -> (depth, shared AdaLN, patch_nums, output file) of a full-size official model whose keys key_list lists
KEY_LISTS = {'var_d36': (36, True, PYRAMID_512, os.path.join(DATA, 'official_var_d36_keys.json'))}
VARHF_FOLDER = os.path.join(DATA, 'official_varhf_tiny')


def official_models(use_implicit: bool, seed: int, sizes: dict = SIZES, shared_aln: bool = False):
    """The official VQVAE (its fixed layout, ch 32) and VAR/VIAR with every parameter ~ N(0, 0.3^2)."""
    from models.var import VAR   # the official package: importable once write() has put its copy on sys.path
    from models.vqvae import VQVAE
    s = sizes
    vae = VQVAE(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=s['patch_nums'])
    var = VAR(vae_local=vae, num_classes=s['num_classes'], depth=s['depth'], embed_dim=s['embed_dim'],
              num_heads=s['num_heads'], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6,
              shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=s['patch_nums'],
              use_implicit=use_implicit, pre_depth=s['pre_depth'], post_depth=s['post_depth'])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(vae.quantize.parameters()) + list(var.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return vae.eval(), var.eval()


def outputs(vae, var, idx_Bl) -> dict:
    """Teacher-forced input and logits, and every scale's sampled token map for each sampler and knob."""
    out = dict(samples={})
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


def record(use_implicit: bool, sizes: dict = SIZES, shared_aln: bool = False, compact_mask: bool = False) -> dict:
    """Weights, inputs and the official outputs in float32; the same outputs in float64 under 'fp64'."""
    vae, var = official_models(use_implicit, seed=10 + use_implicit, sizes=sizes, shared_aln=shared_aln)
    var.cond_drop_rate = 0.0
    g = torch.Generator().manual_seed(20 + use_implicit)
    idx_Bl = [torch.randint(0, sizes['V'], (len(LABELS_TRAIN), pn * pn), generator=g) for pn in sizes['patch_nums']]
    if use_implicit:   # the official trainer draws n and m; fixed here so the fixture is one forward
        var.implicit_no_grad_min_iters = var.implicit_no_grad_max_iters = 2
        var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = 1
    out = dict(var_sd={k: v.clone() for k, v in var.state_dict().items()},   # .double() below converts in place
               quant_sd={k: v.clone() for k, v in vae.quantize.state_dict().items()}, idx_Bl=idx_Bl)
    if compact_mask:   # the (1, 1, L, L) mask is 20 MB at L = 2240: its sha256 stands in for it
        mask = out['var_sd'].pop('attn_bias_for_masking')
        out.update(mask_shape=tuple(mask.shape),
                   mask_sha256=hashlib.sha256(mask.float().contiguous().numpy().tobytes()).hexdigest())
    out.update(outputs(vae, var, idx_Bl))
    out['fp64'] = outputs(vae.double(), var.double(), idx_Bl)   # the same weights, exactly, in float64
    return out


def varhf_folder(out: str):
    """official_tiny.pt's VAR as the official VARHF (its sizes, the fixture's weights) written by its save_pretrained
    into `out` (a temporary folder beside it, then renamed)."""
    from models.var import VARHF   # the official package, as in official_models
    s = SIZES
    model = VARHF(vae_kwargs=dict(vocab_size=s['V'], z_channels=s['Cvae'], ch=32, test_mode=True, share_quant_resi=4,
                                  v_patch_nums=s['patch_nums']),
                  num_classes=s['num_classes'], depth=s['depth'], embed_dim=s['embed_dim'], num_heads=s['num_heads'],
                  drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False,
                  cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=s['patch_nums'])
    fixture = torch.load(CONFIGS['tiny'][-1], map_location='cpu', weights_only=True)
    model.load_state_dict(fixture['var']['var_sd'], strict=True)
    tmp = out + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def patched_copy(official: str) -> str:
    """A temporary copy of the official checkout (without .git) with official_fp64.patch applied; the caller
    removes its parent folder."""
    tmp = tempfile.mkdtemp(prefix='official-fp64-')
    code = os.path.join(tmp, 'code')
    shutil.copytree(official, code, ignore=shutil.ignore_patterns('.git'))
    done = subprocess.run(['git', 'apply', '--unidiff-zero', FP64_PATCH], cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp)
        raise SystemExit(f'{FP64_PATCH} does not apply to {official}: {done.stderr.strip()} '
                         f'(it was made against the official commit e7efe43)')
    return code


def key_list(name: str) -> dict:
    """Every state-dict key and shape, and the parameter count, of a full-size official model.

    The official constructor calls .item() (drop-path rates), so it cannot run on the meta device; it runs on the
    CPU with the layers' reset_parameters disabled, as the official build_vae_var does, and without init_weights:
    the weights are allocated but never written, so their pages are never touched.
    """
    from models.var import VAR   # the official package, as in official_models
    from models.vqvae import VQVAE
    depth, shared_aln, patch_nums, _ = KEY_LISTS[name]
    for clz in (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
                nn.ConvTranspose2d):   # this process only: it builds nothing else
        setattr(clz, 'reset_parameters', lambda self: None)
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums)
    var = VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth, drop_rate=0.0,
              attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, shared_aln=shared_aln,
              cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=patch_nums)
    return dict(_about=f'{name}: the official VAR (depth {depth}, shared AdaLN {shared_aln}, patch_nums {patch_nums}) '
                       f'built (weights never initialised) by tests/make_official_fixture.py --keys {name}',
                depth=depth, shared_aln=shared_aln, patch_nums=list(patch_nums),
                param_count=sum(p.numel() for p in var.parameters()),
                keys={k: list(v.shape) for k, v in var.state_dict().items()})


def code_version(official: str) -> str:
    """The official checkout's git commit; without git, the sha256 over its models/*.py (names and bytes)."""
    try:
        commit = subprocess.run(['git', '-C', official, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout
    except OSError:
        commit = ''
    if commit.strip():
        return commit.strip()
    h = hashlib.sha256()
    folder = os.path.join(official, 'models')
    for name in sorted(n for n in os.listdir(folder) if n.endswith('.py')):
        h.update(name.encode())
        with open(os.path.join(folder, name), 'rb') as f:
            h.update(f.read())
    return 'models-sha256:' + h.hexdigest()[:16]


def machine() -> str:
    """The CPU the float32 outputs were computed on (their last bits depend on it)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown')
    except OSError:
        return 'unknown'


def replace_with(path: str, write):
    """write(tmp) then rename tmp onto path. Not utils.atomic (this process imports nothing of the project), and
    the temporary name is path + '.tmp' because torch names a file's zip records after it."""
    write(path + '.tmp')
    os.replace(path + '.tmp', path)


def write(official: str, code: str, config: str, keys, varhf: bool = False):
    """Import the official models from `code` (the patched copy of `official`) and write the requested file."""
    sys.path[:] = [code] + [p for p in sys.path if p and os.path.abspath(p) not in (os.path.dirname(HERE), os.getcwd())]
    torch.set_num_threads(1)
    commit = code_version(official)
    if varhf:
        varhf_folder(VARHF_FOLDER)
        size = sum(os.path.getsize(os.path.join(VARHF_FOLDER, n)) for n in os.listdir(VARHF_FOLDER))
        print(f'wrote {VARHF_FOLDER} ({size / 1024:.0f} KiB: {", ".join(sorted(os.listdir(VARHF_FOLDER)))}) '
              f'with the official VARHF at {commit}')
        return
    if keys is not None:
        out = KEY_LISTS[keys][-1]
        listing = dict(key_list(keys), official_commit=commit, torch=str(torch.__version__))

        def dump(tmp):
            with open(tmp, 'w') as f:
                json.dump(listing, f, indent=0, sort_keys=True)
        replace_with(out, dump)
        print(f'wrote {out}: {len(listing["keys"])} entries, {listing["param_count"]:,} parameters')
        return
    sizes, shared_aln, out = CONFIGS[config]
    meta = dict(official_commit=commit, torch=str(torch.__version__), sizes=sizes, knobs=KNOBS,
                samplers=SAMPLERS, labels_train=LABELS_TRAIN, labels_sample=LABELS_SAMPLE, g_seed=G_SEED, cfg=CFG,
                dtypes=['float32', 'float64'], machine=machine())
    if config != 'tiny':   # official_tiny.pt's meta names no config
        meta.update(config=config, shared_aln=shared_aln)
    fixture = dict(meta=meta, var=record(False, sizes, shared_aln, config != 'tiny'),
                   viar=record(True, sizes, shared_aln, config != 'tiny'))
    replace_with(out, lambda tmp: torch.save(fixture, tmp))
    print(f'wrote {out} ({os.path.getsize(out) / 1024:.0f} KiB) from the official code at {commit}')


def main(argv=None):
    p = argparse.ArgumentParser(description='Record outputs of the official VIAR code for the tests.')
    p.add_argument('official', help='a checkout of the official VIAR code (mobiushy/VIAR)')
    p.add_argument('--config', default='tiny', choices=sorted(CONFIGS), help='which tiny fixture to write')
    p.add_argument('--keys', default=None, choices=sorted(KEY_LISTS),
                   help="write this full-size model's key/shape list instead of a fixture")
    p.add_argument('--varhf', action='store_true',
                   help="write official_varhf_tiny/ (official_tiny.pt's VAR, saved by the official VARHF) instead")
    a = p.parse_args(argv)
    if not os.path.isdir(os.path.join(a.official, 'models')):
        raise SystemExit(f'{a.official} is not a checkout of the official VIAR code (no models/ folder)')
    official = os.path.abspath(a.official)
    code = patched_copy(official)
    try:
        write(official, code, a.config, a.keys, a.varhf)
    finally:
        shutil.rmtree(os.path.dirname(code))


if __name__ == '__main__':
    main()
