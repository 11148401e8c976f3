"""Build and load the (VQVAE, VAR/VIAR) pair for the sampling scripts from flags or a slim export.

A slim export (`train.py` writes one) is `{'model': state_dict, 'config': ModelSpec fields}`, so
`gen_img.py` / `sampling.py` rebuild the right model from the file alone; the official files carry
no config and are described by the flags (`--depth --use_implicit --pre_depth --post_depth`).
"""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from utils.checkpoint import CheckpointError, load_vae_weights, load_var_weights, read_state_dict, resolve_checkpoint


@dataclass
class ModelSpec:
    """Everything needed to rebuild a VQVAE + transformer pair (official ImageNet sizes by default)."""
    depth: int = 16
    use_implicit: bool = False
    pre_depth: int = 5
    post_depth: int = 5
    embed_dim: Optional[int] = None     # default 64 * depth
    num_heads: Optional[int] = None     # default depth
    patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    V: int = 4096
    Cvae: int = 32
    vae_ch: int = 160
    vae_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_num_res_blocks: int = 2
    num_classes: int = 1000
    shared_aln: bool = False
    attn_l2_norm: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'ModelSpec':
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)


DEFAULT_VAE_CKPT = 'ckpts/vae_ch160v4096z32.pth'   # the official tokenizer of every official transformer


def default_var_ckpt(depth: int, use_implicit: bool) -> str:
    """The official file names: ckpts/viar.pth for VIAR, ckpts/var_d{depth}.pth for VAR."""
    return 'ckpts/viar.pth' if use_implicit else f'ckpts/var_d{depth}.pth'


def build_models(spec: ModelSpec, device='cpu'):
    """(vae, var) for a spec, randomly initialised as the official init does."""
    from models import build_vae_var
    return build_vae_var(device, patch_nums=spec.patch_nums, V=spec.V, Cvae=spec.Cvae, ch=spec.vae_ch,
                         num_classes=spec.num_classes, depth=spec.depth, shared_aln=spec.shared_aln,
                         attn_l2_norm=spec.attn_l2_norm, use_implicit=spec.use_implicit, pre_depth=spec.pre_depth,
                         post_depth=spec.post_depth, embed_dim=spec.embed_dim, num_heads=spec.num_heads,
                         vae_ch_mult=spec.vae_ch_mult, vae_num_res_blocks=spec.vae_num_res_blocks)


def spec_in_file(obj: Any) -> Optional[ModelSpec]:
    """The ModelSpec stored in a slim export or training checkpoint, if any."""
    if isinstance(obj, dict) and isinstance(obj.get('config'), dict):
        return ModelSpec.from_dict(obj['config'])
    return None


def load_models(var_ckpt: str, vae_ckpt: Optional[str], spec: ModelSpec, device='cpu', ema: bool = False,
                random_vae_ok: bool = False):
    """Build from the checkpoint's own config when it has one (else `spec`), then strictly load both files.

    The tokenizer: `vae_ckpt` when given; else the one a slim export embeds ('vae' key); else, for
    vae_ckpt=None, the official file (DEFAULT_VAE_CKPT). vae_ckpt='' with nothing embedded is an error
    (the images would come from a random tokenizer) unless random_vae_ok (speed benchmarks).
    ema=True loads the EMA weights of a training export ('model_ema').
    """
    obj = None
    if var_ckpt:
        path = resolve_checkpoint(var_ckpt)
        try:
            obj = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e:
            raise CheckpointError(f'{path} cannot be read ({type(e).__name__}); the file is truncated or not a '
                                  f'PyTorch checkpoint.') from None
        spec = spec_in_file(obj) or spec
    vae, var = build_models(spec, device)
    if obj is not None:
        if ema:
            if not (isinstance(obj, dict) and isinstance(obj.get('model_ema'), dict)):
                raise CheckpointError(f'{var_ckpt} holds no EMA weights; train with --ema or drop --ema.')
            obj = {'model': obj['model_ema']}
        load_var_weights(var, obj, where=var_ckpt)
    if vae_ckpt:
        load_vae_weights(vae, vae_ckpt)
    elif isinstance(obj, dict) and isinstance(obj.get('vae'), dict):
        load_vae_weights(vae, obj['vae'], where=f'{var_ckpt} (embedded tokenizer)')
    elif vae_ckpt is None:
        load_vae_weights(vae, DEFAULT_VAE_CKPT)
    elif not random_vae_ok:
        raise CheckpointError(f'{var_ckpt or "the model"} embeds no tokenizer and --vae_ckpt is empty: pass the '
                              f'tokenizer file (the official one is {DEFAULT_VAE_CKPT}), or leave --vae_ckpt out '
                              f'to use it.')
    return vae.eval(), var.eval(), spec


def slim_export(var, spec: ModelSpec, vae=None, var_ema_sd=None) -> Dict[str, Any]:
    """The dict `train.py` saves for the sampling scripts."""
    from utils.checkpoint import unwrap_model
    out = {'model': unwrap_model(var).state_dict(), 'config': spec.to_dict()}
    if var_ema_sd is not None:
        out['model_ema'] = var_ema_sd
    if vae is not None:
        out['vae'] = vae.state_dict()
    return out
