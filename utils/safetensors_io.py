"""Checkpoints as .safetensors (tensors and string metadata only, so loading never runs code).

A checkpoint dict's tensor entries keep their key, a state dict entry `part` becomes keys `part/<state-dict key>`
(state-dict keys never hold '/'), every other entry a JSON string in the metadata; `read_safetensors` rebuilds the
dict. A file without the layout marker (a bare state dict from another tool) reads back as its flat dict.

    write_safetensors({'model': var.state_dict(), 'config': spec.to_dict()}, 'var-slim.safetensors')
    obj = read_safetensors('var-slim.safetensors')      # {'model': {...}, 'config': {...}} (tuples become lists)
"""
import json
from typing import Any, Dict, Tuple

import torch
import safetensors.torch

from utils.atomic import atomic_path
from utils.checkpoint import payload_bytes

LAYOUT_KEY = '__viar_layout__'
LAYOUT = 'nested-v1'
SEP = '/'


class SafetensorsLayoutError(ValueError):
    """An object that a .safetensors file cannot hold (nested deeper than a state dict, or not JSON)."""


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(k, str) and SEP not in k and isinstance(v, torch.Tensor) for k, v in value.items())


def pack(obj: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors by flat key, metadata of JSON strings) for a checkpoint dict; SafetensorsLayoutError names an
    entry that fits neither (an optimizer state, a numpy array)."""
    if not isinstance(obj, dict):
        raise SafetensorsLayoutError(f'holds a {type(obj).__name__}, not a dict of weights')
    tensors: Dict[str, torch.Tensor] = {}
    meta = {LAYOUT_KEY: LAYOUT}
    for key, value in obj.items():
        if not isinstance(key, str) or SEP in key or key == LAYOUT_KEY:
            raise SafetensorsLayoutError(f'has the key {key!r}, which a .safetensors layout cannot name')
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif _is_state_dict(value):
            tensors.update({f'{key}{SEP}{k}': v for k, v in value.items()})
        else:
            try:
                meta[key] = json.dumps(value)
            except (TypeError, ValueError):
                raise SafetensorsLayoutError(
                    f"entry {key!r} is neither a state dict nor plain data (it holds {type(value).__name__} with "
                    f"nested tensors or objects)") from None
    return _independent(tensors), meta


def _independent(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors refuses it): a storage seen before is copied."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def unpack(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Dict[str, Any]:
    """Inverse of pack; without the layout marker, the flat dict of tensors as stored."""
    if (meta or {}).get(LAYOUT_KEY) != LAYOUT:
        return dict(tensors)
    out: Dict[str, Any] = {}
    for key, t in tensors.items():
        part, sep, sub = key.partition(SEP)
        if sep:
            out.setdefault(part, {})[sub] = t
        else:
            out[key] = t
    for key, text in meta.items():
        if key != LAYOUT_KEY:
            out[key] = json.loads(text)
    return out


def write_safetensors(obj: Dict[str, Any], path: str):
    """Write a checkpoint dict as .safetensors, atomically (utils.atomic)."""
    tensors, meta = pack(obj)
    with atomic_path(str(path), need=payload_bytes(tensors)) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)


def read_safetensors(path: str) -> Dict[str, Any]:
    """The checkpoint dict in a .safetensors file (tensors on the CPU)."""
    with safetensors.safe_open(str(path), framework='pt', device='cpu') as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack(tensors, meta)
