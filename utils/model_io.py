"""Load (or build) the (VQVAE, VAR/VIAR) pair every script samples with: one loader, one policy.

    vae, var, spec = load_models('demo_output/viar/viar-slim.pth')      # Python: no flags needed
    loaded = load_or_build(source, device)                              # scripts: a ModelSource of flags

Architecture: a checkpoint sets it, from its stored config (slim exports, training checkpoints) or, for
the official files, from what its weights show (`models.config.spec_from_state_dict`); an architecture flag the
user gave that disagrees is reported in one warning line naming the flag and the file's value.
Tokenizer: `vae_ckpt` when given ('random': random weights, for speed tests); else the one a slim export embeds
('vae'); else the one it records ('vae_ref': the official file's name and sha256); else the official file. An
empty `vae_ckpt` means not given, as in training.
Files: `.pth`, `.safetensors`, a Hub folder or repo id, all read by `utils.checkpoint.read_model` (docs/CHECKPOINTS.md).
"""
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from models.config import ModelSpec, spec_from_state_dict, state_dict_kind, vae_arch_from_state_dict
from utils.arch_flags import check_spec, contradiction_text, contradictions
from utils.checkpoint import (OFFICIAL_FILES, CheckpointError, load_vae_weights, load_var_weights, read_model,
                              read_state_dict, resolve_checkpoint, resolve_recorded, save_atomic, sha256_of,
                              spec_in_file, transformer_state_dict, unwrap_model)
from utils.safetensors_io import write_safetensors
from utils.sample.compile_util import Sampler, SamplingError, prepare_for_sampling
from utils.sample.config import recorded_defaults, with_recorded

DEFAULT_VAE_CKPT = 'ckpts/vae_ch160v4096z32.pth'   # the official tokenizer of every official transformer
RANDOM = 'random'


def default_var_ckpt(spec: ModelSpec) -> str:
    """The official file for a spec: ckpts/viar.pth for VIAR, ckpts/var_d{depth}.pth for VAR."""
    return 'ckpts/viar.pth' if spec.kind == 'VIAR' else f'ckpts/var_d{spec.depth}.pth'


def spec_of_file(obj: Any, where: str, fallback: ModelSpec) -> ModelSpec:
    """The architecture a checkpoint holds: its stored config, else what its weights show (official files)."""
    stored = spec_in_file(obj)
    return stored if stored is not None else spec_from_state_dict(transformer_state_dict(obj, where), fallback)


@dataclass
class Loaded:
    """What load_or_build returns: the pair in eval mode, their spec, their checkpoint ('random' for random weights)
    and what the file records."""
    vae: Any
    var: Any
    spec: ModelSpec
    ckpt: str
    class_names: Optional[List[str]] = None
    sample_defaults: Optional[Dict[str, Any]] = None   # the sampling defaults the file records (--sample_defaults)

    @property
    def tag(self) -> str:
        """The checkpoint's file name without its extension: output folders are named by it."""
        return os.path.splitext(os.path.basename(os.path.normpath(self.ckpt)))[0]


@dataclass
class Tokenizer:
    """Where the tokenizer's weights come from: a file (a path or an official name), weights a checkpoint holds
    (random=True too when they were drawn at random for a test run), or random initialisation; `where` names it."""
    path: str = ''
    weights: Optional[Dict[str, Any]] = None
    random: bool = False
    where: str = ''

    def describe(self) -> str:
        if self.random:
            return 'RANDOM weights (--vae_ckpt random: for tests and speed measurements)'
        return self.where or self.path


def tokenizer_of_file(obj: Any, where: str) -> Optional[Tokenizer]:
    """The tokenizer a checkpoint embeds or records: a slim export's 'vae' / 'vae_ref', a training checkpoint's
    weights or recorded file; None when it says nothing (the official files: their tokenizer is the official one)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get('vae'), dict):
        return Tokenizer(weights=obj['vae'], where=f'the tokenizer {where} embeds')
    if isinstance(obj.get('vae_ref'), dict):
        return Tokenizer(path=resolve_recorded(obj['vae_ref'], where), where=f'the tokenizer {where} records')
    trainer = obj.get('trainer')
    recorded = obj.get('tokenizer')
    if isinstance(trainer, dict) and isinstance(trainer.get('vae_local'), dict):
        random = isinstance(recorded, dict) and bool(recorded.get('random'))
        return Tokenizer(weights=trainer['vae_local'], random=random, where=f'the tokenizer {where} holds')
    if isinstance(recorded, dict) and recorded.get('path'):
        return Tokenizer(path=recorded['path'], where=f'{recorded["path"]} (recorded by {where})')
    return None


def given_tokenizer(vae_ckpt: Optional[str], obj: Any, where: str) -> Tokenizer:
    """The tokenizer rule of the module docstring, for a checkpoint's contents `obj` read from `where`."""
    if vae_ckpt == RANDOM:
        return Tokenizer(random=True)
    tok = None if vae_ckpt else tokenizer_of_file(obj, where)
    return tok or Tokenizer(path=vae_ckpt or DEFAULT_VAE_CKPT, where=vae_ckpt or DEFAULT_VAE_CKPT)


def load_tokenizer(vae, tok: Tokenizer):
    """Load a Tokenizer's weights into `vae` (random: left as initialised)."""
    if tok.weights is not None:
        load_vae_weights(vae, tok.weights, where=tok.where)
    elif not tok.random:
        load_vae_weights(vae, tok.path)


def tokenizer_state_dict(tok: Tokenizer) -> Optional[Dict[str, Any]]:
    """The tokenizer's weights (read from its file when it has one); None when random."""
    if tok.random:
        return None
    return tok.weights if tok.weights is not None else read_state_dict(resolve_checkpoint(tok.path))


def load_models(var_ckpt: str, vae_ckpt: Optional[str] = None, spec: Optional[ModelSpec] = None, device='cpu',
                ema: bool = False, given: Optional[Mapping[str, Any]] = None,
                log: Callable[[str], None] = print) -> Tuple[Any, Any, ModelSpec]:
    """(vae, var, spec) from a checkpoint, strictly loaded, in eval mode; the file sets the architecture.

    spec: sizes the file cannot tell (an official file's tokenizer channels); the official ones when None. given:
    the architecture flags the user gave (field -> value), those the file overrides said through `log`. ema=True:
    a training export's EMA weights ('model_ema').
    """
    return _load(var_ckpt, vae_ckpt, spec, device, ema, given, log)[:3]


def _load(var_ckpt: str, vae_ckpt: Optional[str], spec: Optional[ModelSpec], device, ema: bool,
          given: Optional[Mapping[str, Any]], log: Callable[[str], None]) -> Tuple[Any, Any, ModelSpec, Any]:
    """load_models, and the file's contents."""
    obj = read_model(var_ckpt)
    file_spec = spec_of_file(obj, var_ckpt, spec or ModelSpec())
    tok = given_tokenizer(vae_ckpt, obj, var_ckpt)
    if spec_in_file(obj) is None and vae_ckpt:   # a file without a config: sizes from the tokenizer file given
        sd = tokenizer_state_dict(tok)
        if sd is not None and state_dict_kind(sd) == 'vae':   # otherwise load_tokenizer explains the mistake
            file_spec = ModelSpec.from_dict(dict(file_spec.to_dict(), **vae_arch_from_state_dict(sd)))
            tok = replace(tok, weights=sd)   # loaded below from what was just read, not from the file again
    ignored = contradictions(given or {}, file_spec)   # flags the user gave that the file overrides
    if ignored:
        log(f'warning: {var_ckpt} sets the architecture ({file_spec.kind} depth {file_spec.depth}, width '
            f'{file_spec.width}); ignored: {contradiction_text(ignored, "file")}')
    vae, var = file_spec.build(device)
    if ema and not (isinstance(obj, dict) and isinstance(obj.get('model_ema'), dict)):
        raise CheckpointError(f'{var_ckpt} holds no EMA weights; train with --ema or drop --ema.')
    load_var_weights(var, {'model': obj['model_ema']} if ema else obj, where=var_ckpt)
    load_tokenizer(vae, tok)
    return vae.eval(), var.eval(), file_spec, obj


def peek_spec(source) -> ModelSpec:
    """The architecture a ModelSource will load, without building it (reads the checkpoint once)."""
    flags_spec = source.spec()
    if source.var_ckpt == RANDOM:
        return flags_spec
    var_ckpt = source.var_ckpt or default_var_ckpt(flags_spec)
    return spec_of_file(read_model(var_ckpt), var_ckpt, flags_spec)


def load_or_build(source, device='cpu', log: Callable[[str], None] = print, seed: int = 0) -> Loaded:
    """The pair a `utils.sample.config.ModelSource` describes: its checkpoint (an official name when none is
    given), or seeded random weights of the flags' size with --var_ckpt random (plus --vae_ckpt if given)."""
    flags_spec = source.spec()
    try:
        if source.var_ckpt == RANDOM:
            check_spec(flags_spec)   # a bad size named by its flag
            torch.manual_seed(seed)   # the same random model on every run
            vae, var = flags_spec.build(device)
            if source.vae_ckpt and source.vae_ckpt != RANDOM:
                load_vae_weights(vae, source.vae_ckpt)
            return Loaded(vae.eval(), var.eval(), flags_spec, RANDOM)
        var_ckpt = source.var_ckpt or default_var_ckpt(flags_spec)
        vae, var, spec, obj = _load(var_ckpt, source.vae_ckpt, flags_spec, device, source.ema, source.arch, log)
    except ValueError as e:   # sizes the model constructors reject
        raise CheckpointError(f'cannot build the model from these flags: {e}') from None
    return Loaded(vae, var, spec, var_ckpt, class_names=class_names_in(obj),
                  sample_defaults=sample_defaults_in(obj, var_ckpt))


def load_sampler(source, sample, device, log: Callable[[str], None] = print, info: Callable[[str], None] = print
                 ) -> Tuple[Loaded, Sampler, Any]:
    """The pair a ModelSource describes, its Sampler for a `utils.sample.config.SampleConfig` (--dtype, --compile,
    --fast), and the config with the file's recorded sampling defaults in place of the flags not typed (said
    through `info`), checked against the model; a checkpoint or option that does not work is a one-line SystemExit."""
    try:
        loaded = load_or_build(source, device, log=log)
        sample, line = with_recorded(sample, loaded.sample_defaults)
        if line:
            info(line)
        sampler = prepare_for_sampling(loaded.var, compile=sample.compile, dtype=sample.dtype, fast=sample.fast,
                                       scope=sample.compile_scope)
        sample.check_model(loaded.var, log=log)
    except (CheckpointError, SamplingError) as e:
        raise SystemExit(f'error: {e}') from None
    return loaded, sampler, sample


def class_names_in(obj: Any) -> Optional[List[str]]:
    """The class names a slim export or training checkpoint records, if any."""
    names = obj.get('class_names') if isinstance(obj, dict) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def sample_defaults_in(obj: Any, where: str) -> Optional[Dict[str, Any]]:
    """The sampling defaults a slim export or training checkpoint records ('sampling'), checked; None if none."""
    recorded = obj.get('sampling') if isinstance(obj, dict) else None
    if not recorded:
        return None
    try:
        return recorded_defaults(recorded, where=f"{where}'s recorded sampling defaults")
    except SamplingError as e:
        raise CheckpointError(f'{e}; type the sampling flags instead, or re-export the file') from None


def tokenizer_ref(vae_ckpt: str) -> Optional[Dict[str, str]]:
    """How a slim export records an official tokenizer: its name and sha256 (None for any other, which is embedded)."""
    name = os.path.basename(vae_ckpt or '')
    if name not in OFFICIAL_FILES:
        return None
    return dict(name=name, sha256=sha256_of(resolve_checkpoint(vae_ckpt)))


def slim_export(var, spec: ModelSpec, vae=None, var_ema_sd=None, vae_ref: Optional[Dict[str, str]] = None,
                model_sd: Optional[Dict[str, Any]] = None, class_names: Optional[List[str]] = None,
                sample_defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The dict `train.py` saves for the sampling scripts (its entries: docs/TRAINING.md, Outputs). model_sd: the
    weights already gathered into one ordinary state dict (a sharded model), else var's own."""
    out = {'model': unwrap_model(var).state_dict() if model_sd is None else model_sd, 'config': spec.to_dict()}
    if class_names:
        out['class_names'] = list(class_names)
    if sample_defaults:
        out['sampling'] = dict(sample_defaults)
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
    (utils.safetensors_io's layout); both sample the same images."""
    save_atomic(export, path)
    write_safetensors(export, safetensors_twin(path))
