"""Hub folders: VAR / VIAR as `PyTorchModelHubMixin` classes, with the official `VARHF` config keys.

A folder holds `config.json` (the constructor keywords: `vae_kwargs`, the tokenizer's VQVAE keywords, and the
official VAR keywords; a VIAR adds `use_implicit`, `pre_depth`, `post_depth` and the four `implicit_*` S-JFB
bounds under the official VAR constructor's names) and `model.safetensors` (the transformer, official keys).
Folders written here also hold `vae.safetensors` (the tokenizer), so one folder samples images; a folder written by
the official `VARHF.save_pretrained` has no tokenizer weights, and `tokenizer_loaded` stays False until
`load_vae_weights(model.vae_proxy[0], 'vae_ch160v4096z32.pth')` (utils.checkpoint) loads the official file.

    model = hub_model(vae, var, spec)             # a VARHF (a VAR) or a VIARHF (a VIAR) holding these weights
    model.save_pretrained('var-d16')              # config.json, model.safetensors, vae.safetensors
    model = VARHF.from_pretrained('var-d16')      # the class the config names, transformer loaded strictly
"""
import logging
import os
from typing import Any, Dict, Optional

import safetensors.torch
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from models.var import VAR
from models.viar import VIAR
from models.vqvae import VQVAE

log = logging.getLogger(__name__)

WEIGHTS_FILE = 'model.safetensors'
VAE_FILE = 'vae.safetensors'
# VQVAE keywords the official tokenizer does not take: written to vae_kwargs only when they differ from these
_VAE_OFFICIAL_FIXED = dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)


class HubLoadError(OSError):
    """A folder or repo id that cannot be read (offline, missing, or without a config)."""


def _var_kwargs(num_classes, depth, embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate,
                norm_eps, shared_aln, cond_drop_rate, attn_l2_norm, patch_nums) -> Dict[str, Any]:
    """The official VAR keywords as this project's constructor takes them (flash/fused are the kernels' business)."""
    return dict(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
                shared_aln=shared_aln, cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm,
                patch_nums=tuple(patch_nums))


def _build_vae(vae_kwargs: Dict[str, Any]) -> VQVAE:
    kw = dict(vae_kwargs)
    for name in ('v_patch_nums', 'ch_mult'):   # JSON gives lists
        if name in kw:
            kw[name] = tuple(kw[name])
    return VQVAE(**kw)


def _resolve(model_id: str, filename: str, optional: bool = False, **download) -> Optional[str]:
    """Path of `filename` in a local folder or a Hub repo (downloaded); None if `optional` and absent."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if os.path.isfile(path):
            return path
        if optional:
            return None
        raise HubLoadError(f'{model_id}: no {filename} in this folder')
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **download)
    except EntryNotFoundError:
        if optional:
            return None
        raise


class _HubIO(PyTorchModelHubMixin):
    """Saving and loading shared by VARHF and VIARHF: transformer + tokenizer files, strict transformer load."""

    tokenizer_loaded = False

    def _save_pretrained(self, save_directory):
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                                    os.path.join(save_directory, WEIGHTS_FILE))
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.vae_proxy[0].state_dict().items()},
                                    os.path.join(save_directory, VAE_FILE))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kw):
        """The mixin's loader; an unreachable repo id fails with one line naming it."""
        model_id = str(pretrained_model_name_or_path)
        try:
            return super().from_pretrained(model_id, **kw)
        except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError) as e:
            raise HubLoadError(f'{model_id}: not a local folder, and its files cannot be fetched from the Hub '
                               f'({type(e).__name__}; offline, or no such repo)') from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         config: Optional[Dict[str, Any]] = None, map_location: str = 'cpu', strict: bool = True,
                         **model_kwargs):
        if config is None:
            raise HubLoadError(f'{model_id}: no config.json (a VARHF folder holds config.json and {WEIGHTS_FILE})')
        model_cls = VIARHF if config.get('use_implicit') else VARHF
        if issubclass(cls, VIARHF) and model_cls is VARHF:   # VARHF reads both kinds; VIARHF only its own
            raise HubLoadError(f'{model_id} holds a VAR (no use_implicit in config.json): load it with VARHF')
        keys = set(model_cls._hub_mixin_init_parameters) - {'self'}
        unknown = sorted(set(config) - keys)
        if unknown:   # a misspelt or foreign key would otherwise fall back to a default without a word
            raise HubLoadError(f'{model_id}/config.json: keys {unknown} are not {model_cls.__name__} keywords')
        model = model_cls(**{**config, **{k: v for k, v in model_kwargs.items() if k in keys}})
        download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                        local_files_only=local_files_only)
        from utils.checkpoint import load_var_weights
        weights = _resolve(model_id, WEIGHTS_FILE, **download)
        load_var_weights(model, safetensors.torch.load_file(weights), strict=strict, where=weights)
        vae_path = _resolve(model_id, VAE_FILE, optional=True, **download)
        if vae_path is None:
            log.warning('%s holds no tokenizer weights (an official VARHF folder): load them with '
                        'utils.checkpoint.load_vae_weights(model.vae_proxy[0], "vae_ch160v4096z32.pth")', model_id)
        else:
            model.vae_proxy[0].load_state_dict(safetensors.torch.load_file(vae_path), strict=True)
            model.tokenizer_loaded = True
        return model.to(map_location).eval()


class VARHF(VAR, _HubIO):
    """VAR with the official `VARHF` constructor: it builds its VQVAE from `vae_kwargs`. `from_pretrained` returns
    a VIARHF where the folder's config says `use_implicit`."""

    def __init__(self, vae_kwargs, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available=True, fused_if_available=True):
        del flash_if_available, fused_if_available
        super().__init__(_build_vae(vae_kwargs), **_var_kwargs(
            num_classes, depth, embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate,
            norm_eps, shared_aln, cond_drop_rate, attn_l2_norm, patch_nums))


class VIARHF(VIAR, _HubIO):
    """VIAR with VARHF's keywords plus the official VAR constructor's VIAR keywords."""

    def __init__(self, vae_kwargs, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available=True, fused_if_available=True,
                 use_implicit=True, pre_depth=5, post_depth=5,
                 implicit_no_grad_min_iters=0, implicit_no_grad_max_iters=10,
                 implicit_with_grad_min_iters=1, implicit_with_grad_max_iters=12):
        del flash_if_available, fused_if_available
        if not use_implicit:
            raise ValueError('VIARHF is the implicit model (use_implicit=True); VARHF builds a VAR')
        super().__init__(_build_vae(vae_kwargs), pre_depth=pre_depth, post_depth=post_depth,
                         jfb_no_grad=(implicit_no_grad_min_iters, implicit_no_grad_max_iters),
                         jfb_with_grad=(implicit_with_grad_min_iters, implicit_with_grad_max_iters),
                         **_var_kwargs(num_classes, depth, embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                                       drop_path_rate, norm_eps, shared_aln, cond_drop_rate, attn_l2_norm,
                                       patch_nums))


def hub_config(spec, var) -> Dict[str, Any]:
    """The VARHF / VIARHF constructor keywords of a models.config.ModelSpec and the model built from it (which
    holds the training-only values: drop path, class dropout, S-JFB ranges)."""
    vae_kwargs = dict(vocab_size=spec.V, z_channels=spec.Cvae, ch=spec.vae_ch, share_quant_resi=4,
                      v_patch_nums=tuple(spec.patch_nums), test_mode=True)
    for name, value in (('ch_mult', tuple(spec.vae_ch_mult)), ('num_res_blocks', spec.vae_num_res_blocks)):
        if value != _VAE_OFFICIAL_FIXED[name]:
            vae_kwargs[name] = value
    cfg = dict(vae_kwargs=vae_kwargs, num_classes=spec.num_classes, depth=spec.depth, embed_dim=spec.width,
               num_heads=spec.heads, shared_aln=spec.shared_aln, attn_l2_norm=spec.attn_l2_norm,
               patch_nums=tuple(spec.patch_nums),
               drop_path_rate=var.drop_path_rate, cond_drop_rate=var.cond_drop_rate)
    if spec.use_implicit:
        no_grad, with_grad = var.jfb_no_grad, var.jfb_with_grad
        cfg.update(use_implicit=True, pre_depth=spec.pre_depth, post_depth=spec.post_depth,
                   implicit_no_grad_min_iters=no_grad[0], implicit_no_grad_max_iters=no_grad[1],
                   implicit_with_grad_min_iters=with_grad[0], implicit_with_grad_max_iters=with_grad[1])
    return cfg


def hub_model(vae: VQVAE, var, spec) -> '_HubIO':
    """A VARHF or VIARHF (by `spec.kind`) holding copies of `vae`'s and `var`'s weights, ready to save_pretrained."""
    cfg = hub_config(spec, var)
    model = (VIARHF if spec.use_implicit else VARHF)(**cfg)
    model.load_state_dict(var.state_dict(), strict=True)
    model.vae_proxy[0].load_state_dict(vae.state_dict(), strict=True)
    model.tokenizer_loaded = True
    return model.to(next(var.parameters()).device).eval()
