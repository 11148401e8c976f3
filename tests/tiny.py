"""Tiny model builders shared by the tests (CPU, milliseconds), and an op recorder."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_vae_var

TINY_PN = (1, 2, 3, 4)


def tiny_vae_var(use_implicit: bool, depth: int = 4, width: int = 32, heads: int = 2, pre: int = 1, post: int = 1,
                 V: int = 48, Cvae: int = 8, num_classes: int = 5, seed: int = 0, patch_nums=TINY_PN, **kw):
    """A VQVAE for 8 px images (4x4 latent) and a VAR/VIAR of `width` channels, deterministic for a seed."""
    torch.manual_seed(seed)
    vae, var = build_vae_var('cpu', patch_nums=patch_nums, V=V, Cvae=Cvae, ch=32, share_quant_resi=4,
                             num_classes=num_classes, depth=depth, use_implicit=use_implicit, pre_depth=pre,
                             post_depth=post, embed_dim=width, num_heads=heads, vae_ch_mult=(1, 1),
                             vae_num_res_blocks=1, **kw)
    # random AdaLN gates and head so every block and every scale matters in the tests
    with torch.no_grad():
        for name, p in var.named_parameters():
            if 'ada_lin' in name or name.startswith('head.'):
                p.normal_(0, 0.3)
    return vae.eval(), var.eval()


def tiny_tokens(vae, var, B: int, seed: int = 1):
    """Random ground-truth token maps and the matching teacher-forcing input."""
    g = torch.Generator().manual_seed(seed)
    idx_Bl = [torch.randint(0, var.V, (B, pn * pn), generator=g) for pn in var.patch_nums]
    return idx_Bl, vae.quantize.idxBl_to_var_input(idx_Bl)


def tiny_spec(use_implicit: bool = True):
    """The ModelSpec of tiny_vae_var's defaults (what a slim export of those models records)."""
    from models.config import ModelSpec
    return ModelSpec(depth=4, use_implicit=use_implicit, pre_depth=1, post_depth=1, embed_dim=32, num_heads=2,
                     patch_nums=TINY_PN, V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1), vae_num_res_blocks=1,
                     num_classes=5)


def write_tiny_export(path: str, use_implicit: bool = True) -> str:
    """A slim export (weights, config, embedded tokenizer) of tiny_vae_var's models at `path`; returns the path."""
    from utils.checkpoint import save_atomic
    from utils.model_io import slim_export
    vae, var = tiny_vae_var(use_implicit)
    save_atomic(slim_export(var, tiny_spec(use_implicit), vae=vae), str(path))
    return str(path)


class OpNames(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))
