"""Load (or build) the (VQVAE, VAR/VIAR) pair every script samples with: one loader, one policy.

    vae, var, spec = load_models('demo_output/viar/viar-slim.pth')      # Python: no flags needed
    loaded = load_or_build(source, device)                              # scripts: a ModelSource of flags

Architecture: a checkpoint sets it, from its stored config (slim exports, training checkpoints) or, for
the official files, from what its weights show (`models.config.spec_from_state_dict`); a model flag the
user typed that disagrees is reported in one warning line naming the flag, a default is silently replaced.
Tokenizer: `vae_ckpt` when given; else the one a slim export embeds ('vae'); else the one it records
('vae_ref': the official file's name and sha256); else the official file.
Files: `.pth` or `.safetensors` (train.py writes its slim export as both); every read goes through
`utils.checkpoint.read_checkpoint`, which never runs code.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from models.config import ARCH_FIELDS, ModelSpec, spec_from_state_dict, state_dict_kind, vae_arch_from_state_dict
from utils.checkpoint import (OFFICIAL_FILES, CheckpointError, extract_state_dict, load_vae_weights,
                              load_var_weights, read_checkpoint, resolve_checkpoint, unwrap_model)

DEFAULT_VAE_CKPT = 'ckpts/vae_ch160v4096z32.pth'   # the official tokenizer of every official transformer
RANDOM = 'random'
# ModelSpec field -> the sampling scripts' flag that sets it
SPEC_FLAGS = dict(depth='depth', use_implicit='use_implicit', pre_depth='pre_depth', post_depth='post_depth',
                  embed_dim='width', num_heads='heads', patch_nums='patch_nums', V='V', Cvae='Cvae', vae_ch='vae_ch',
                  vae_ch_mult='vae_ch_mult', vae_num_res_blocks='vae_num_res_blocks', num_classes='num_classes')


def default_var_ckpt(spec: ModelSpec) -> str:
    """The official file for a spec: ckpts/viar.pth for VIAR, ckpts/var_d{depth}.pth for VAR."""
    return 'ckpts/viar.pth' if spec.kind == 'VIAR' else f'ckpts/var_d{spec.depth}.pth'


def spec_in_file(obj: Any) -> Optional[ModelSpec]:
    """The ModelSpec stored in a slim export or training checkpoint, if any."""
    if isinstance(obj, dict) and isinstance(obj.get('config'), dict):
        return ModelSpec.from_dict(obj['config'])
    return None


def spec_of_file(obj: Any, where: str, fallback: ModelSpec) -> ModelSpec:
    """The architecture a checkpoint holds: its stored config, else what its weights show (official files)."""
    stored = spec_in_file(obj)
    if stored is not None:
        return stored
    sd = extract_state_dict(obj, where)
    kind = state_dict_kind(sd)
    if kind == 'vae':
        raise CheckpointError(f'{where} is a VQVAE tokenizer file; pass it as --vae_ckpt, not as the transformer '
                              f'checkpoint.')
    if kind == 'unknown':
        raise CheckpointError(f'{where} holds no VAR/VIAR weights (no class_emb.weight); pass a transformer '
                              f'checkpoint (official var_d*.pth / viar.pth, or a train.py export).')
    return spec_from_state_dict(sd, fallback)


def disagreements(spec: ModelSpec, flags_spec: ModelSpec, typed: Callable[[str], bool]) -> List[str]:
    """'--flag value (file: value)' for every architecture flag the user typed that the file overrides."""
    out = []
    for name, mine, theirs in flags_spec.differences(spec, ARCH_FIELDS):
        flag = SPEC_FLAGS.get(name)   # shared AdaLN and attention norm have no sampling flag: never typed
        if flag is not None and typed(flag):
            show = (lambda v: ','.join(map(str, v)) if isinstance(v, tuple) else v)
            out.append(f'--{flag} {show(mine)} (file: {show(theirs)})')
    return out


@dataclass
class Loaded:
    """What load_or_build returns: the pair in eval mode, their spec, a tag for output names, notes printed."""
    vae: Any
    var: Any
    spec: ModelSpec
    tag: str
    notes: List[str] = field(default_factory=list)


def _load_tokenizer(vae, vae_ckpt: Optional[str], obj: Any, where: str, random_vae_ok: bool):
    """The tokenizer rule of the module docstring."""
    if vae_ckpt:
        load_vae_weights(vae, vae_ckpt)
    elif isinstance(obj, dict) and isinstance(obj.get('vae'), dict):
        load_vae_weights(vae, obj['vae'], where=f'{where} (embedded tokenizer)')
    elif isinstance(obj, dict) and isinstance(obj.get('vae_ref'), dict) and vae_ckpt is None:
        from utils.checkpoint import resolve_recorded
        load_vae_weights(vae, resolve_recorded(obj['vae_ref'], where))
    elif vae_ckpt is None:
        load_vae_weights(vae, DEFAULT_VAE_CKPT)
    elif not random_vae_ok:
        raise CheckpointError(f'{where or "the model"} embeds no tokenizer and --vae_ckpt is empty: pass the '
                              f'tokenizer file (the official one is {DEFAULT_VAE_CKPT}), or leave --vae_ckpt out '
                              f'to use it.')


def _with_tokenizer_sizes(spec: ModelSpec, vae_ckpt: Optional[str]) -> ModelSpec:
    """For a file without a config: the tokenizer's sizes from the tokenizer file itself."""
    if not vae_ckpt:
        return spec
    sd = extract_state_dict(read_checkpoint(resolve_checkpoint(vae_ckpt)), vae_ckpt)
    if state_dict_kind(sd) != 'vae':
        return spec   # load_vae_weights explains the mistake
    return ModelSpec.from_dict(dict(spec.to_dict(), **vae_arch_from_state_dict(sd)))


def load_models(var_ckpt: str, vae_ckpt: Optional[str] = None, spec: Optional[ModelSpec] = None, device='cpu',
                ema: bool = False, random_vae_ok: bool = False, typed: Callable[[str], bool] = lambda flag: False,
                log: Callable[[str], None] = print) -> Tuple[Any, Any, ModelSpec]:
    """(vae, var, spec) from a checkpoint, strictly loaded, in eval mode; the file sets the architecture.

    spec: sizes the file cannot tell (an official file says nothing about its tokenizer's channels); the
    official ones when None. typed(flag) says whether the user typed a model flag: those the file
    overrides are reported through `log`. ema=True loads a training export's EMA weights ('model_ema').
    vae_ckpt='' with nothing embedded is an error (random tokenizer) unless random_vae_ok (speed benchmarks).
    """
    flags_spec = spec or ModelSpec()
    path = resolve_checkpoint(var_ckpt)
    obj = read_checkpoint(path)
    file_spec = spec_of_file(obj, var_ckpt, flags_spec)
    if spec_in_file(obj) is None:
        file_spec = _with_tokenizer_sizes(file_spec, vae_ckpt)
    overridden = disagreements(file_spec, flags_spec, typed)
    if overridden:
        log(f'warning: {var_ckpt} sets the architecture ({file_spec.kind} depth {file_spec.depth}, width '
            f'{file_spec.width}); ignored: {", ".join(overridden)}')
    vae, var = file_spec.build(device)
    if ema:
        if not (isinstance(obj, dict) and isinstance(obj.get('model_ema'), dict)):
            raise CheckpointError(f'{var_ckpt} holds no EMA weights; train with --ema or drop --ema.')
        load_var_weights(var, {'model': obj['model_ema']}, where=var_ckpt)
    else:
        load_var_weights(var, obj, where=var_ckpt)
    _load_tokenizer(vae, vae_ckpt, obj, var_ckpt, random_vae_ok)
    return vae.eval(), var.eval(), file_spec


def peek_spec(source) -> ModelSpec:
    """The architecture a ModelSource will load, without building it (reads the checkpoint once)."""
    flags_spec = source.spec()
    if source.var_ckpt == RANDOM:
        return flags_spec
    var_ckpt = source.var_ckpt or default_var_ckpt(flags_spec)
    return spec_of_file(read_checkpoint(resolve_checkpoint(var_ckpt)), var_ckpt, flags_spec)


def load_or_build(source, device='cpu', log: Callable[[str], None] = print, random_vae_ok: bool = False,
                  seed: int = 0) -> Loaded:
    """The pair a `utils.sample.config.ModelSource` describes: its checkpoint (an official name when none is
    given), or seeded random weights of the flags' size with --var_ckpt random (plus --vae_ckpt if given)."""
    flags_spec = source.spec()
    try:
        if source.var_ckpt == RANDOM:
            torch.manual_seed(seed)   # the same random model on every run
            vae, var = flags_spec.build(device)
            if source.vae_ckpt:
                load_vae_weights(vae, source.vae_ckpt)
            return Loaded(vae.eval(), var.eval(), flags_spec, RANDOM)
        var_ckpt = source.var_ckpt or default_var_ckpt(flags_spec)
        vae, var, spec = load_models(var_ckpt, source.vae_ckpt, flags_spec, device=device, ema=source.ema,
                                     random_vae_ok=random_vae_ok, typed=source.was_typed, log=log)
    except ValueError as e:   # sizes the model constructors reject
        raise CheckpointError(f'cannot build the model from these flags: {e}') from None
    return Loaded(vae, var, spec, os.path.splitext(os.path.basename(var_ckpt))[0])


def tokenizer_ref(vae_ckpt: str) -> Optional[Dict[str, str]]:
    """How a slim export records a tokenizer it does not embed: the official file's name and sha256
    (None for any other file, which is embedded)."""
    name = os.path.basename(vae_ckpt or '')
    if name not in OFFICIAL_FILES:
        return None
    from utils.checkpoint import sha256_of
    return dict(name=name, sha256=sha256_of(resolve_checkpoint(vae_ckpt)))


def slim_export(var, spec: ModelSpec, vae=None, var_ema_sd=None, vae_ref: Optional[Dict[str, str]] = None,
                model_sd: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The dict `train.py` saves for the sampling scripts: weights, config, and the tokenizer (embedded as
    'vae', or recorded as 'vae_ref' = official name + sha256). model_sd: the weights already gathered into one
    ordinary state dict (a sharded model), else var's own."""
    out = {'model': unwrap_model(var).state_dict() if model_sd is None else model_sd, 'config': spec.to_dict()}
    if var_ema_sd is not None:
        out['model_ema'] = var_ema_sd
    if vae is not None:
        out['vae'] = vae.state_dict()
    if vae_ref is not None:
        out['vae_ref'] = dict(vae_ref)
    return out


def safetensors_twin(path: str) -> str:
    """The .safetensors file written beside a slim export `path` (viar-slim.pth -> viar-slim.safetensors)."""
    return os.path.splitext(path)[0] + '.safetensors'


def save_slim(export: Dict[str, Any], path: str):
    """Write a slim export twice, atomically: `path` (torch.save, loads weights-only) and its .safetensors twin
    (weights, EMA weights and embedded tokenizer under 'model/', 'model_ema/', 'vae/'; config and vae_ref as
    JSON metadata). Both load with load_models and sample the same images."""
    from utils.checkpoint import save_atomic
    from utils.safetensors_io import write_safetensors
    save_atomic(export, path)
    write_safetensors(export, safetensors_twin(path))
