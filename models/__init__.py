"""Models: the multi-scale VQVAE tokenizer and the VAR / VIAR transformers."""
import inspect
from typing import Tuple

import torch

from models.var import EditSpec, SampleStats, VAR, VARBase
from models.viar import VIAR
from models.vqvae import VQVAE
from models.quant import VectorQuantizer2

__all__ = ['build_vae_var', 'build_var', 'VAR', 'VIAR', 'VARBase', 'VQVAE', 'VectorQuantizer2', 'EditSpec',
           'SampleStats', 'VARHF']


def __getattr__(name: str):
    """`models.VARHF` (models/hub.py) imported on first use: huggingface_hub loads only for Hub folders."""
    if name == 'VARHF':
        from models.hub import VARHF
        return VARHF
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def build_var(vae_local, depth: int = 16, use_implicit: bool = False, **kw) -> VARBase:
    """VAR or VIAR from `use_implicit`: the one place where that choice is made. Keywords only VIAR's constructor
    takes (pre_depth, post_depth, the S-JFB ranges, ...) are left out for a VAR."""
    if use_implicit:
        return VIAR(vae_local, depth=depth, **kw)
    viar_only = set(inspect.signature(VIAR.__init__).parameters) - set(inspect.signature(VARBase.__init__).parameters)
    return VAR(vae_local, depth=depth, **{k: v for k, v in kw.items() if k not in viar_only})


def build_vae_var(device, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160, share_quant_resi=4,
                  num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True,
                  flash_if_available=True, fused_if_available=True,
                  init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,
                  use_implicit=False, pre_depth=5, post_depth=5, *,
                  embed_dim=None, num_heads=None, vae_ch_mult=(1, 1, 2, 2, 4), vae_num_res_blocks=2,
                  cond_drop_rate=0.1, drop_path_rate=None, jfb_no_grad=(0, 10), jfb_with_grad=(1, 12),
                  **var_kw) -> Tuple[VQVAE, VARBase]:
    """Build the frozen VQVAE and an initialised VAR/VIAR with the official sizing (width 64*depth, heads = depth).

    Keyword-compatible with the official `build_vae_var`: flash/fused_if_available are accepted and ignored
    (scaled_dot_product_attention picks its kernels); var_kw: further transformer keywords (ModelSpec passes every
    transformer field). The transformer is built on the meta device and materialised once, so no time goes into an
    init that init_weights overwrites."""
    del flash_if_available, fused_if_available
    width = embed_dim or 64 * depth
    heads = num_heads or depth
    dpr = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
    vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                v_patch_nums=patch_nums, ch_mult=vae_ch_mult, num_res_blocks=vae_num_res_blocks).to(device)
    with torch.device('meta'):
        var = build_var(vae, depth=depth, use_implicit=use_implicit, pre_depth=pre_depth, post_depth=post_depth,
                        jfb_no_grad=jfb_no_grad, jfb_with_grad=jfb_with_grad,
                        num_classes=num_classes, embed_dim=width, num_heads=heads, drop_rate=0.0, attn_drop_rate=0.0,
                        drop_path_rate=dpr, norm_eps=1e-6, shared_aln=shared_aln, cond_drop_rate=cond_drop_rate,
                        attn_l2_norm=attn_l2_norm, patch_nums=patch_nums, **var_kw)
    var = var.to_empty(device=device)
    with torch.no_grad():
        var.reset_buffers()
        var.reset_embeddings()
        for b in var.backbone_blocks():
            if b.shared_aln:
                b.ada_gss.data.normal_().div_(b.C ** 0.5)
    var.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return vae, var
