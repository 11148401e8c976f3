"""Checkpoint files: atomic writes, model unwrapping, official-file download, and loads that explain mismatches.

One helper for every script: training state, slim exports and the official `vae_ch160v4096z32.pth`,
`var_d{16,20,24,30}.pth`, `viar.pth` all load through `load_var_weights` / `load_vae_weights`.
"""
import hashlib
import os
import re
import socket
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

OFFICIAL_FILES = {
    'vae_ch160v4096z32.pth': 'FoundationVision/var',
    'var_d16.pth': 'FoundationVision/var',
    'var_d20.pth': 'FoundationVision/var',
    'var_d24.pth': 'FoundationVision/var',
    'var_d30.pth': 'FoundationVision/var',
    'var_d36.pth': 'FoundationVision/var',   # VAR-d36-s: 512 px, shared AdaLN
    'viar.pth': 'mobiushy/VIAR',
}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the requested model."""


def save_atomic(obj: Any, path: str):
    """torch.save through utils.atomic.atomic_path: a crash leaves the old file intact."""
    from utils.atomic import atomic_path
    with atomic_path(str(path)) as tmp:
        torch.save(obj, tmp)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, 'module') and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or huggingface.co cannot be reached within `timeout` seconds."""
    if os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0'):
        return False
    try:
        socket.create_connection(('huggingface.co', 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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
        url = f'https://huggingface.co/{repo}/resolve/main/{name}'
        if not hub_reachable():   # fail at once instead of after the hub client's retries
            raise CheckpointError(f'{path!r} not found and the Hugging Face hub is unreachable from here. Download '
                                  f'{url} and put it at {local} (or pass its path).')
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(repo_id=repo, filename=name, local_dir=ckpt_dir)
        except Exception as e:   # offline, hub down, or no huggingface_hub
            raise CheckpointError(
                f'{path!r} not found and could not be downloaded from the Hugging Face hub ({type(e).__name__}). '
                f'Download {url} and put it at {local} (or pass its path).') from None
    raise CheckpointError(f'checkpoint {path!r} does not exist. Pass the path of a .pth file '
                          f'(official names download automatically: {", ".join(OFFICIAL_FILES)}).')


def read_checkpoint(path: str) -> Any:
    """What a checkpoint file holds (the one place this project reads checkpoint files)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'{path} cannot be read ({type(e).__name__}: {e}); the file is truncated or not a '
                              f'PyTorch checkpoint. Download or export it again.') from None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The model state dict inside a file: a bare state dict, a training checkpoint, or a slim export."""
    return extract_state_dict(read_checkpoint(path), path)


def extract_state_dict(obj: Any, where: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Find the transformer/VAE weights in the known checkpoint layouts."""
    if isinstance(obj, dict) and 'trainer' in obj and isinstance(obj['trainer'], dict):
        obj = obj['trainer'].get('var_wo_ddp', obj['trainer'])
    elif isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        obj = obj['model']
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{where} holds no state dict of tensors.')
    return {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in obj.items()}


def sha256_of(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def resolve_recorded(ref: Dict[str, str], where: str, ckpt_dir: str = 'ckpts') -> str:
    """The local path of a tokenizer a slim export records by official name and sha256 (found or downloaded).

    A recorded file that cannot be found or fetched, or whose bytes differ, is a one-line CheckpointError.
    """
    name = ref.get('name', '')
    try:
        path = resolve_checkpoint(os.path.join(ckpt_dir, name), ckpt_dir)
    except CheckpointError as e:
        raise CheckpointError(f'{where} records its tokenizer as {name} (sha256 {ref.get("sha256", "?")[:12]}...), '
                              f'which is not here: {e} Or pass --vae_ckpt PATH.') from None
    if ref.get('sha256') and sha256_of(path) != ref['sha256']:
        raise CheckpointError(f'{path} is not the tokenizer {where} was trained with (sha256 differs from the '
                              f'recorded {ref["sha256"][:12]}...); pass that tokenizer with --vae_ckpt.')
    return path


def _describe(sd: Dict[str, torch.Tensor], model: Optional[nn.Module] = None, fallback=None
              ) -> Tuple[str, Optional[Any]]:
    """('a VIAR checkpoint (depth .., width ..)', its spec) for a state dict (of `model` when given, else sizes
    the weights cannot tell come from `fallback`); spec None for non-transformers."""
    from models.config import spec_from_state_dict, spec_of_model, state_dict_kind, vae_arch_from_state_dict
    kind = state_dict_kind(sd)
    if kind == 'vae':
        a = vae_arch_from_state_dict(sd)
        return f"a VQVAE tokenizer file (V={a['V']}, Cvae={a['Cvae']}, ch={a['vae_ch']})", None
    if kind == 'unknown':
        return 'not a VAR/VIAR/VQVAE checkpoint', None
    spec = spec_of_model(model) if model is not None else spec_from_state_dict(sd, fallback)
    blocks = f', pre {spec.pre_depth}, post {spec.post_depth}' if kind == 'VIAR' else ''
    blocks += ', shared AdaLN' if spec.shared_aln else ''
    pn = spec.patch_nums
    blocks += '' if pn == type(spec)().patch_nums else f', {len(pn)} scales up to {pn[-1]}x{pn[-1]}'
    return f'a {kind} checkpoint (depth {spec.depth}, width {spec.width}{blocks})', spec


def load_var_weights(var: nn.Module, path_or_sd, strict: bool = True, where: Optional[str] = None):
    """Load transformer weights with strict key/shape checks; a mismatch says what the file is, the flags that
    build it (every one that differs, from the file's own config when it has one) and the loader that needs none."""
    where = where or (path_or_sd if isinstance(path_or_sd, str) else 'state dict')
    obj = read_checkpoint(resolve_checkpoint(path_or_sd)) if isinstance(path_or_sd, str) else path_or_sd
    sd = extract_state_dict(obj, where)
    var = unwrap_model(var)
    want, want_spec = _describe(var.state_dict(), var)
    got, got_spec = _describe(sd, fallback=want_spec)   # sizes the weights cannot tell: the model's
    if got_spec is None or want_spec is None or got_spec.differences(want_spec):
        if got_spec is not None:
            from models.config import ModelSpec
            stored = obj.get('config') if isinstance(obj, dict) and isinstance(obj.get('config'), dict) else None
            flags = (ModelSpec.from_dict(stored) if stored else got_spec).flags(against=want_spec)
            hint = (f' Build it with {flags}, or let utils.model_io.load_models({where!r}) build the model from '
                    f'the file (the sampling scripts do that: no flags needed).')
        elif got.startswith('a VQVAE'):
            hint = ' Pass it as --vae_ckpt, not as the transformer checkpoint.'
        else:
            hint = ''
        raise CheckpointError(f'{where} is {got}, but the model built is {want}.{hint}')
    _strict_load(var, sd, where, strict)


def load_vae_weights(vae: nn.Module, path_or_sd, strict: bool = True, where: Optional[str] = None):
    """Load tokenizer weights; a transformer file passed here gets a clear error."""
    where = where or (path_or_sd if isinstance(path_or_sd, str) else 'state dict')
    sd = read_state_dict(resolve_checkpoint(path_or_sd)) if isinstance(path_or_sd, str) else extract_state_dict(path_or_sd, where)
    got, _ = _describe(sd)
    if not got.startswith('a VQVAE'):
        raise CheckpointError(f'{where} is {got}, not a VQVAE tokenizer. Pass the tokenizer file '
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
