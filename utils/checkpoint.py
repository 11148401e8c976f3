"""Checkpoint files: atomic writes, model unwrapping, official-file download, and loads that explain mismatches.

Every file is read by `read_checkpoint` without running code: `.pth` with `torch.load(weights_only=True)` (tensors,
numbers, strings, lists, dicts, numpy arrays), `.safetensors` through utils.safetensors_io. A file that asks to run
code is refused with UnsafeCheckpointError, which names `scripts/convert_checkpoint.py` for files the user trusts.
Weights go into a model through `load_var_weights` / `load_vae_weights`; a transformer source (a file, a Hub folder
or repo id) is read by `read_model`.
"""
import collections
import hashlib
import importlib
import os
import pathlib
import pickle
import re
import socket
import warnings
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

# Project modules are imported inside the functions that use them: bench/official_runner.py loads this file by
# path in a process where `utils` and `models` are the official code's packages.

OFFICIAL_FILES = {
    'vae_ch160v4096z32.pth': 'FoundationVision/var',
    'var_d16.pth': 'FoundationVision/var',
    'var_d20.pth': 'FoundationVision/var',
    'var_d24.pth': 'FoundationVision/var',
    'var_d30.pth': 'FoundationVision/var',
    'var_d36.pth': 'FoundationVision/var',   # VAR-d36-s: 512 px, shared AdaLN
    'viar.pth': 'mobiushy/VIAR',
}
# sha256 checked before a downloaded (or ckpts/-placed) official file is used: FoundationVision/var's Hugging Face LFS
# pointers at revision 6d0ee6598a42f75079aa79e58b012b57b284c91b. None: no published digest known, not checked.
OFFICIAL_SHA256 = {
    'vae_ch160v4096z32.pth': '7c3ec27ae28a3f87055e83211ea8cc8558bd1985d7b51742d074fb4c2fcf186c',
    'var_d16.pth': '4f6151aad91c94e03e224dd7358d8389fa05301c0c291279566998efb54b0ecb',
    'var_d20.pth': 'f7d232978e6fe82a4f2e0f5d82b012e01b1aa5abfe93ce2b56104ec0e878a10f',
    'var_d24.pth': '12c03619b2d3906ed19fe59539a90aadf60d72287dbaa31cf540435e76ddf789',
    'var_d30.pth': '7b11551dd4d794c7d6ed10b3d2822d42efe609a86128171b646e543dd2633b56',
    'var_d36.pth': None,
    'viar.pth': None,
}
REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')   # owner/name on the Hugging Face Hub
CHECKPOINT_EXTS = ('.pth', '.pt', '.safetensors', '.bin', '.ckpt')


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the requested model."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose unpickling would run code (an old or a hostile pickle): never loaded."""


class OfficialDigestError(CheckpointError):
    """A file with an official name in the download folder whose bytes are not the official file's."""


def save_atomic(obj: Any, path: str):
    """torch.save through utils.atomic.atomic_path (a full disk is a one-line WriteError with the bytes needed)."""
    from utils.atomic import atomic_path
    with atomic_path(str(path), need=payload_bytes(obj)) as tmp:
        torch.save(obj, tmp)


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a (nested) checkpoint object: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return int(getattr(obj, 'nbytes', 0) or 0)   # numpy arrays


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
        return verify_official(path, ckpt_dir)
    name = os.path.basename(path or '')
    if name in OFFICIAL_FILES:
        local = os.path.join(ckpt_dir, name)
        if os.path.isfile(local):
            return verify_official(local, ckpt_dir)
        fix = f'Download {official_url(name)} and put it at {local} (or pass its path).'
        if not hub_reachable():   # fail at once instead of after the hub client's retries
            raise CheckpointError(f'{path!r} not found and the Hugging Face hub is unreachable from here. {fix}')
        try:
            from huggingface_hub import hf_hub_download
            got = hf_hub_download(repo_id=OFFICIAL_FILES[name], filename=name, local_dir=ckpt_dir)
        except Exception as e:   # offline, hub down, or no huggingface_hub
            raise CheckpointError(f'{path!r} not found and could not be downloaded from the Hugging Face hub '
                                  f'({type(e).__name__}). {fix}') from None
        return verify_official(got, os.path.dirname(got))
    raise CheckpointError(f'checkpoint {path!r} does not exist. Pass the path of a .pth or .safetensors file, a Hub '
                          f'folder or repo id (owner/name) (official names download automatically: '
                          f'{", ".join(OFFICIAL_FILES)}).')


def is_hub_source(path: str) -> bool:
    """Whether a transformer source names a Hub folder: an existing local folder, or a repo id (owner/name) that is
    no local path and has no checkpoint file extension (official names such as ckpts/var_d16.pth download as files)."""
    path = path or ''
    if os.path.exists(path):
        return os.path.isdir(path)
    return bool(REPO_ID.fullmatch(path)) and not path.endswith(CHECKPOINT_EXTS)


def read_model(path: str) -> Any:
    """What a transformer source holds, read without running code: a checkpoint file (official names download, see
    resolve_checkpoint), or a Hub folder or repo id (is_hub_source) as the slim export it amounts to (models/hub.py:
    'model', 'config', and 'vae', 'sampling', 'class_names' when the folder holds them)."""
    if not is_hub_source(path):
        return read_checkpoint(resolve_checkpoint(path))
    from models.hub import read_folder   # huggingface_hub: loaded only for Hub sources
    return read_folder(path)


def fetch_model(path: str) -> None:
    """Bring a transformer source onto this machine without reading it: an official file, or a Hub repo's
    snapshot into the Hub cache (a local file or folder needs nothing)."""
    if not is_hub_source(path):
        resolve_checkpoint(path)
    elif not os.path.isdir(path):
        from models.hub import download_repo
        download_repo(path)


def official_url(name: str) -> str:
    """Where the hub serves an official file."""
    return f'https://huggingface.co/{OFFICIAL_FILES[name]}/resolve/main/{name}'


def verify_official(path: str, ckpt_dir: str = 'ckpts') -> str:
    """path, after checking an official file in the download folder against its pinned sha256 (OFFICIAL_SHA256);
    a mismatch is a one-line OfficialDigestError. A file elsewhere is the user's own and is not checked, even
    if it has an official name (a fine-tuned var_d16.pth)."""
    name = os.path.basename(path)
    want = OFFICIAL_SHA256.get(name)
    if not want or os.path.abspath(os.path.dirname(path)) != os.path.abspath(ckpt_dir):
        return path
    got = sha256_of(path)
    if got != want:
        raise OfficialDigestError(f'{path} is not the official {name}: its sha256 differs from the pinned digest '
                                  f'({got[:12]}... instead of {want[:12]}...); the download is corrupt or was '
                                  f'replaced. Delete it and download {official_url(name)} again.')
    return path


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs, and nothing else: the array reconstructor (it makes an empty array
    of an allowed type), the array and dtype types; numpy 1.x wrote the reconstructor's path as numpy.core."""
    core = getattr(np, '_core', None) or np.core
    rebuild = core.multiarray._reconstruct
    dtype_classes = [c for c in vars(getattr(np, 'dtypes', object)).values()   # numpy >= 1.25: one per dtype
                     if isinstance(c, type) and issubclass(c, np.dtype)]
    return [rebuild, (rebuild, 'numpy.core.multiarray._reconstruct'), (rebuild, 'numpy._core.multiarray._reconstruct'),
            np.ndarray, np.dtype, *dtype_classes]


def refusal(path: str, why: str = '') -> str:
    """The one line every entry point prints for a file whose loading would run code (why: 'calls io.open')."""
    what = f' (it {why})' if why else ''
    return (f'{path} asks to run code when loaded{what} and was not loaded. If you trust this file, convert it '
            f'to the safe format: python scripts/convert_checkpoint.py {path} OUT --i_trust_this_file')


def _refused_call(message: str, path: str) -> Optional[str]:
    """Why a weights-only load refused a file ('calls io.open'), from its error; None when the failure is
    damage, not a refusal."""
    m = re.search(r'GLOBAL (\S+)', message) or re.search(r'Can only (?:create new object|build) .* got (.+)$',
                                                          message, re.M)
    if m:
        return f'calls {m.group(1).strip()}'
    if re.search(r'Unsupported operand|persistent|String is too long', message):
        with open(path, 'rb') as f:   # a pickle stream (PROTO opcode) or a torch zip: instructions outside the set
            if f.read(1) == b'\x80' or zipfile.is_zipfile(path):
                return 'holds pickle instructions outside the weights-only set'
    return None


def read_checkpoint(path: str, mmap: bool = False) -> Any:
    """What a checkpoint file holds, read without running code (the one reader of checkpoint files). mmap=True maps
    a zip .pth's tensors (ranks of a node share the pages). A file asking to run code raises UnsafeCheckpointError;
    a truncated or foreign file, CheckpointError."""
    try:
        if str(path).endswith('.safetensors'):
            from utils.safetensors_io import read_safetensors   # it imports this module
            return read_safetensors(path)
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')   # raw pickles: refused below
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:   # also safetensors' own errors and a bad JSON metadata entry
        why = _refused_call(str(e), path) if isinstance(e, pickle.UnpicklingError) else None
        if why is not None:
            raise UnsafeCheckpointError(refusal(path, why)) from None
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> CheckpointError:
    """The one line for a file that did not load: what it is when it is no checkpoint (an image, a saved web page),
    else a damaged checkpoint. Never the loader's advice to retry with weights_only=False, which would run code."""
    from utils.file_kind import not_a_checkpoint
    other = not_a_checkpoint(path)
    if other:
        return CheckpointError(f'{path} {other}')
    first = re.split(r'(?<=\.)\s', str(e).strip())[0]   # the first sentence
    quiet = not first or re.search(r'weights.only', first, re.I)
    detail = '' if quiet else f'; {type(e).__name__}: {first.rstrip(".")}'
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    return CheckpointError(f'{path} cannot be read: it begins like a checkpoint but is truncated or damaged '
                           f'({size} bytes{detail}). Download or export it again.')


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


def spec_in_file(obj: Any):
    """The ModelSpec stored in a slim export or training checkpoint ('config'), if any."""
    from models.config import ModelSpec
    return ModelSpec.from_dict(obj['config']) if isinstance(obj, dict) and isinstance(obj.get('config'), dict) else None


def transformer_state_dict(obj: Any, where: str) -> Dict[str, torch.Tensor]:
    """extract_state_dict of a VAR/VIAR checkpoint; a tokenizer or foreign file is a one-line CheckpointError."""
    from models.config import state_dict_kind
    sd = extract_state_dict(obj, where)
    kind = state_dict_kind(sd)
    if kind == 'vae':
        raise CheckpointError(f'{where} is a VQVAE tokenizer file; pass it as --vae_ckpt, not as the transformer '
                              f'checkpoint.')
    if kind == 'unknown':
        raise CheckpointError(f'{where} holds no VAR/VIAR weights (no class_emb.weight); pass a transformer '
                              f'checkpoint (official var_d*.pth / viar.pth, or a train.py export).')
    return sd


def sha256_of(path: str) -> str:
    """Hex sha256 of a file's bytes, hashed once per process while its size and mtime stay the same (an 8 GB
    var_d30.pth takes seconds, and several callers of one run check the official tokenizer)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: Dict[tuple, str] = {}   # (path, size, mtime_ns) -> sha256 of the files this process has hashed


def resolve_recorded(ref: Dict[str, str], where: str, ckpt_dir: str = 'ckpts') -> str:
    """The local path of a tokenizer a slim export records by official name and sha256 (found or downloaded); one
    that cannot be found or fetched, or whose bytes differ, is a one-line CheckpointError."""
    name = ref.get('name', '')
    try:
        path = resolve_checkpoint(os.path.join(ckpt_dir, name), ckpt_dir)
    except OfficialDigestError:
        raise
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


def _read_source(path_or_sd, where: Optional[str]) -> Tuple[Any, str]:
    """(contents, name for messages) of a path (official names download) or of a checkpoint already in memory."""
    if isinstance(path_or_sd, str):
        return read_checkpoint(resolve_checkpoint(path_or_sd)), where or path_or_sd
    return path_or_sd, where or 'state dict'


def load_var_weights(var: nn.Module, path_or_sd, strict: bool = True, where: Optional[str] = None):
    """Load transformer weights with strict key/shape checks; a mismatch says what the file is, the flags that
    build it (every one that differs, from the file's own config when it has one) and the loader that needs none."""
    obj, where = _read_source(path_or_sd, where)
    sd = extract_state_dict(obj, where)
    var = unwrap_model(var)
    want, want_spec = _describe(var.state_dict(), var)
    got, got_spec = _describe(sd, fallback=want_spec)   # sizes the weights cannot tell: the model's
    if got_spec is None or want_spec is None or got_spec.differences(want_spec):
        if got_spec is not None:
            from utils.arch_flags import flags_to_build
            flags = flags_to_build(spec_in_file(obj) or got_spec, against=want_spec)
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
    obj, where = _read_source(path_or_sd, where)
    sd = extract_state_dict(obj, where)
    got, _ = _describe(sd)
    if not got.startswith('a VQVAE'):
        raise CheckpointError(f'{where} is {got}, not a VQVAE tokenizer. Pass the tokenizer file '
                              f'(e.g. vae_ch160v4096z32.pth) as --vae_ckpt.')
    _strict_load(vae, sd, where, strict)


def _strict_load(model: nn.Module, sd: Dict[str, torch.Tensor], where: str, strict: bool):
    own = model.state_dict()
    bad_shapes = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = (sorted(set(own) - set(sd)), sorted(set(sd) - set(own))) if strict else ([], [])
    parts = [f'{len(items)} {what} (e.g. {items[0]})' for what, items in
             (('shape mismatches', bad_shapes), ('missing keys', missing), ('unexpected keys', unexpected)) if items]
    if parts:
        raise CheckpointError(f'{where} does not fit the model: ' + '; '.join(parts) +
                              '. Check the model flags (depth, patch_nums, V, Cvae, ch) against the file.')
    model.load_state_dict(sd, strict=strict)


# ---------------------------------------------------------------- sharded checkpoints (torch.distributed.checkpoint)

DCP_MODULES = ('torch.distributed.checkpoint.metadata', 'torch.distributed.checkpoint.filesystem',
               'torch.distributed.checkpoint.planner')


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a damaged pickle)."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file allowing only what it is made of: DCP's own metadata dataclasses and
    enums, torch.Size, dtypes and the layout lookup, and paths; anything else (a callable) is refused."""
    ALLOWED = {('torch', 'Size'): torch.Size, ('collections', 'OrderedDict'): collections.OrderedDict,
               ('torch.serialization', '_get_layout'): torch.serialization._get_layout,   # a layout name -> strided
               **{('torch', n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)},
               **{('pathlib', n): getattr(pathlib, n)
                  for n in ('PosixPath', 'WindowsPath', 'PurePosixPath', 'PureWindowsPath')}}

    def find_class(self, module: str, name: str):
        if module in DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:   # a class defined there, not an import
                return obj
        elif (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        raise _Refused(f'{module}.{name}')


def read_dcp_metadata(path: str):
    """The `Metadata` in a torch.distributed.checkpoint folder's `.metadata` file (a pickle that DCP itself
    loads with full unpickling), read without running code; a hostile file is an UnsafeCheckpointError."""
    try:
        with open(path, 'rb') as f:
            return _DCPMetadataUnpickler(f).load()
    except _Refused as e:
        raise UnsafeCheckpointError(f'{path} asks to run code when loaded (it calls {e}) and was not loaded: '
                                    f'it is not metadata that torch.distributed.checkpoint writes.') from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as e:
        raise CheckpointError(f'{path} cannot be read as sharded-checkpoint metadata ({type(e).__name__}: {e}); '
                              f'the folder is incomplete or damaged.') from None
