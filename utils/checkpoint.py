"""Checkpoint files: atomic writes, model unwrapping, official-file download, and loads that explain mismatches.

One helper for every script: training state, slim exports and the official `vae_ch160v4096z32.pth`,
`var_d{16,20,24,30}.pth`, `viar.pth` all load through `load_var_weights` / `load_vae_weights`.
"""
import os
import re
import tempfile
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

OFFICIAL_FILES = {
    'vae_ch160v4096z32.pth': 'FoundationVision/var',
    'var_d16.pth': 'FoundationVision/var',
    'var_d20.pth': 'FoundationVision/var',
    'var_d24.pth': 'FoundationVision/var',
    'var_d30.pth': 'FoundationVision/var',
    'viar.pth': 'mobiushy/VIAR',
}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the requested model."""


def save_atomic(obj: Any, path: str):
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, 'module') and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def resolve_checkpoint(path: str, ckpt_dir: str = 'ckpts') -> str:
    """A local path; an official file name missing locally is downloaded from the Hugging Face hub into ckpt_dir."""
    if path and os.path.isfile(path):
        return path
    name = os.path.basename(path or '')
    if name in OFFICIAL_FILES:
        local = os.path.join(ckpt_dir, name)
        if os.path.isfile(local):
            return local
        repo = OFFICIAL_FILES[name]
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(repo_id=repo, filename=name, local_dir=ckpt_dir)
        except Exception as e:   # offline, hub down, or no huggingface_hub
            raise CheckpointError(
                f'{path!r} not found and could not be downloaded from the Hugging Face hub ({type(e).__name__}). '
                f'Download https://huggingface.co/{repo}/resolve/main/{name} and put it at {local} '
                f'(or pass its path).') from None
    raise CheckpointError(f'checkpoint {path!r} does not exist. Pass the path of a .pth file '
                          f'(official names download automatically: {", ".join(OFFICIAL_FILES)}).')


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The model state dict inside a file: a bare state dict, a training checkpoint, or a slim export."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'{path} cannot be read ({type(e).__name__}: {e}); the file is truncated or not a '
                              f'PyTorch checkpoint. Download or export it again.') from None
    return extract_state_dict(obj, path)


def extract_state_dict(obj: Any, where: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Find the transformer/VAE weights in the known checkpoint layouts."""
    if isinstance(obj, dict) and 'trainer' in obj and isinstance(obj['trainer'], dict):
        obj = obj['trainer'].get('var_wo_ddp', obj['trainer'])
    elif isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        obj = obj['model']
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{where} holds no state dict of tensors.')
    return {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in obj.items()}


def _count(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split('.')[1] for k in sd if k.startswith(prefix + '.')})


def describe_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What a state dict is: kind ('vae', 'var', 'viar', 'unknown'), and for transformers depth/width/heads."""
    if 'quantize.embedding.weight' in sd and 'encoder.conv_in.weight' in sd:
        V, Cvae = sd['quantize.embedding.weight'].shape
        return dict(kind='vae', V=V, Cvae=Cvae, ch=sd['encoder.conv_in.weight'].shape[0])
    if 'class_emb.weight' not in sd:
        return dict(kind='unknown')
    width = sd['class_emb.weight'].shape[1]
    heads_key = next((k for k in sd if k.endswith('attn.scale_mul_1H11')), None)
    heads = sd[heads_key].shape[1] if heads_key else None
    info = dict(width=width, heads=heads, num_classes=sd['class_emb.weight'].shape[0] - 1,
                V=sd['head.weight'].shape[0] if 'head.weight' in sd else None)
    if any(k.startswith('implicit_block.') for k in sd):
        pre, post = _count(sd, 'pre_blocks'), _count(sd, 'post_blocks')
        # the official sizing is width = 64 * depth, heads = depth; the block count is not stored for VIAR
        return dict(kind='viar', depth=width // 64 if width % 64 == 0 else heads, pre_depth=pre, post_depth=post, **info)
    return dict(kind='var', depth=_count(sd, 'blocks'), **info)


def _flags_for(info: Dict[str, Any]) -> str:
    if info['kind'] == 'viar':
        return f"--depth {info['depth']} --use_implicit True --pre_depth {info['pre_depth']} --post_depth {info['post_depth']}"
    return f"--depth {info['depth']} --use_implicit False"


def _describe(info: Dict[str, Any]) -> str:
    if info['kind'] == 'vae':
        return f"a VQVAE tokenizer file (V={info['V']}, Cvae={info['Cvae']}, ch={info['ch']})"
    if info['kind'] == 'viar':
        return f"a VIAR checkpoint (depth {info['depth']}, width {info['width']}, pre {info['pre_depth']}, post {info['post_depth']})"
    if info['kind'] == 'var':
        return f"a VAR checkpoint (depth {info['depth']}, width {info['width']})"
    return 'not a VAR/VIAR/VQVAE checkpoint'


def load_var_weights(var: nn.Module, path_or_sd, strict: bool = True, where: Optional[str] = None):
    """Load transformer weights with strict key/shape checks; a mismatch says what the file is and which flags load it."""
    where = where or (path_or_sd if isinstance(path_or_sd, str) else 'state dict')
    sd = read_state_dict(resolve_checkpoint(path_or_sd)) if isinstance(path_or_sd, str) else extract_state_dict(path_or_sd, where)
    var = unwrap_model(var)
    got, want = describe_state_dict(sd), describe_state_dict(var.state_dict())
    if got['kind'] != want['kind'] or any(got.get(k) != want.get(k) for k in ('depth', 'width', 'pre_depth', 'post_depth')):
        hint = f' Load it with {_flags_for(got)}.' if got['kind'] in ('var', 'viar') else ''
        if got['kind'] == 'vae':
            hint = ' Pass it as --vae_ckpt, not as the transformer checkpoint.'
        raise CheckpointError(f'{where} is {_describe(got)}, but the model built is {_describe(want)}.{hint}')
    _strict_load(var, sd, where, strict)


def load_vae_weights(vae: nn.Module, path_or_sd, strict: bool = True, where: Optional[str] = None):
    """Load tokenizer weights; a transformer file passed here gets a clear error."""
    where = where or (path_or_sd if isinstance(path_or_sd, str) else 'state dict')
    sd = read_state_dict(resolve_checkpoint(path_or_sd)) if isinstance(path_or_sd, str) else extract_state_dict(path_or_sd, where)
    got = describe_state_dict(sd)
    if got['kind'] != 'vae':
        raise CheckpointError(f'{where} is {_describe(got)}, not a VQVAE tokenizer. Pass the tokenizer file '
                              f'(e.g. vae_ch160v4096z32.pth) as --vae_ckpt.')
    _strict_load(vae, sd, where, strict)


def _strict_load(model: nn.Module, sd: Dict[str, torch.Tensor], where: str, strict: bool):
    own = model.state_dict()
    bad_shapes = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if bad_shapes or (strict and (missing or unexpected)):
        parts = []
        if bad_shapes:
            parts.append(f'{len(bad_shapes)} shape mismatches (e.g. {bad_shapes[0]})')
        if strict and missing:
            parts.append(f'{len(missing)} missing keys (e.g. {missing[0]})')
        if strict and unexpected:
            parts.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})')
        raise CheckpointError(f'{where} does not fit the model: ' + '; '.join(parts) +
                              '. Check the model flags (depth, patch_nums, V, Cvae, ch) against the file.')
    model.load_state_dict(sd, strict=strict)
