"""Which model a training run builds, and with which tokenizer.

A new run builds what its architecture flags say (ModelSpec's defaults for the rest); `--init_ckpt`,
`--init_from_var` and a resume build what the file is, with the tokenizer it comes with. An architecture flag
that contradicts the file is refused in one line naming the flag, the file's value and the command that works.
The rules: docs/TRAINING.md, "Fine-tuning and starting VIAR from VAR".
"""
import os
import shlex
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from models.config import ModelSpec, spec_from_state_dict, state_dict_kind, vae_arch_from_state_dict
from models.layout import num_tokens
from utils.arch_flags import SPELLING, contradiction_text, contradictions, flag_name
from utils.checkpoint import CheckpointError, read_state_dict, resolve_checkpoint
from utils.model_io import DEFAULT_VAE_CKPT, RANDOM, Tokenizer, tokenizer_of_file, tokenizer_state_dict

FINE_TUNE_FREE = ('num_classes',)
VIAR_FROM_VAR_FREE = ('num_classes', 'use_implicit', 'pre_depth', 'post_depth')


class ArchitectureError(SystemExit):
    """A flag that contradicts the file a run starts from, or a tokenizer that cannot be had; one line."""


@dataclass
class Architecture:
    """What a run builds: the spec (its classes may still come from the data), the tokenizer, and what set them."""
    spec: ModelSpec
    tokenizer: Tokenizer
    source: str                      # 'the flags', or the file that set the architecture
    init_sd: Optional[Dict[str, Any]] = None   # the transformer weights of --init_ckpt / --init_from_var


def suggestion(argv: Sequence[str], drop: Sequence[str]) -> str:
    """The command line without the flags (and their values) in `drop`: 'python train.py --a=1 --b 2'."""
    drop_names, out, skip = set(drop), [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        name = tok.split('=', 1)[0]
        if name in drop_names:
            if '=' not in tok and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                skip = True   # '--flag value'
            continue
        out.append(tok)
    return 'python train.py ' + ' '.join(shlex.quote(t) for t in out)


def aliases_of(field: str) -> Tuple[str, ...]:
    """Every spelling of a field's flag (and --p_depth for the VIAR block counts)."""
    names = SPELLING.get(field, (f'--{field}',))
    return names + (('--p_depth',) if field in ('pre_depth', 'post_depth') else ())


def refuse(items, where: str, argv: Sequence[str], free: Sequence[str], what: str, hint: str = ''):
    """The one-line refusal for flags that contradict a file: what they are, the file's values, what works."""
    drop = [name for n, _, _ in items for name in aliases_of(n)]
    may = ', '.join(flag_name(f) for f in free) or 'none'
    raise ArchitectureError(
        f'error: {contradiction_text(items, where)}: {what} keeps the architecture of {where} (architecture flags it '
        f'may change: {may}).{hint} Run it without them: {suggestion(argv, drop)}')


def check_patch_size(patch_size: Optional[int], spec: ModelSpec, source: str, argv: Sequence[str]):
    """--patch_size, when given, must be the tokenizer's downsampling (it is derived from it)."""
    if patch_size is not None and patch_size != spec.downsample:
        raise ArchitectureError(
            f'error: --patch_size {patch_size} contradicts {source}: its tokenizer downsamples by {spec.downsample} '
            f'(vae_ch_mult {"_".join(map(str, spec.vae_ch_mult))}). Run it without --patch_size: '
            f'{suggestion(argv, ["--patch_size"])}')


# ---------------------------------------------------------------- the tokenizer

def tokenizer_sizes(tok: Tokenizer) -> Dict[str, Any]:
    """The tokenizer's sizes as ModelSpec fields, read off its weights (random: none)."""
    try:
        sd = tokenizer_state_dict(tok)
    except CheckpointError as e:
        raise ArchitectureError(f'error: the tokenizer {tok.path} cannot be loaded: {e} Or pass --vae_ckpt PATH (a '
                                f'train_tokenizer.py vae.pth), or --vae_ckpt random for a test run.') from None
    if sd is None:
        return {}
    if state_dict_kind(sd) != 'vae':
        raise ArchitectureError(f'error: --vae_ckpt {tok.path} is not a VQVAE tokenizer file; pass the tokenizer '
                                f'(e.g. the vae.pth of train_tokenizer.py, or {DEFAULT_VAE_CKPT}).')
    return vae_arch_from_state_dict(sd)


def pick_tokenizer(vae_ckpt: Optional[str], of_file: Optional[Tokenizer], source: str, argv: Sequence[str],
                   default: str = DEFAULT_VAE_CKPT) -> Tokenizer:
    """The file's tokenizer, else the flag's, else `default` (the official one, or the one a token cache was made
    with); `--vae_ckpt random` only for a new run or a file trained with it."""
    if vae_ckpt == RANDOM:
        if of_file is not None and not of_file.random:
            raise ArchitectureError(f'error: --vae_ckpt random contradicts {source}, which comes with '
                                    f'{of_file.where}. Run it without --vae_ckpt: '
                                    f'{suggestion(argv, ["--vae_ckpt"])}')
        return of_file or Tokenizer(random=True)
    if of_file is not None:
        if vae_ckpt and not same_tokenizer(vae_ckpt, of_file):
            raise ArchitectureError(f'error: --vae_ckpt {vae_ckpt} is not {of_file.where}, which {source} was trained '
                                    f'with. Run it without --vae_ckpt: {suggestion(argv, ["--vae_ckpt"])}')
        return of_file
    path = vae_ckpt or default
    return Tokenizer(path=path, where=path)


def same_tokenizer(vae_ckpt: str, tok: Tokenizer) -> bool:
    """Whether a --vae_ckpt file holds the same weights as a tokenizer (compared by the file, else by tensors)."""
    try:
        resolved = resolve_checkpoint(vae_ckpt)
        if tok.path and os.path.abspath(resolve_checkpoint(tok.path)) == os.path.abspath(resolved):
            return True
        theirs, mine = tokenizer_state_dict(tok), read_state_dict(resolved)
    except CheckpointError:
        return False
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---------------------------------------------------------------- the architecture

def from_flags(given: Mapping[str, Any], tok: Tokenizer, argv: Sequence[str]) -> ModelSpec:
    """A new run: the flags, with the tokenizer's sizes from its file (given ones must agree)."""
    sizes = tokenizer_sizes(tok)
    clash = [(n, given[n], sizes[n]) for n in sizes if n in given and given[n] != sizes[n]]
    if clash:
        refuse(clash, tok.path, argv, (), 'a run with this tokenizer')
    return ModelSpec(**{**given, **sizes})


def from_file(obj: Any, sd: Mapping[str, Any], where: str, given: Mapping[str, Any]) -> ModelSpec:
    """The architecture a checkpoint holds: its stored config, else its weights (sizes they cannot tell: given
    flags, then the official ones)."""
    if isinstance(obj, dict) and isinstance(obj.get('config'), dict):
        return ModelSpec.from_dict(obj['config'])
    spec = spec_from_state_dict(sd, ModelSpec(**given))
    L, K = sd['pos_1LC'].shape[1], sd['lvl_embed.weight'].shape[0]
    if (num_tokens(spec.patch_nums), len(spec.patch_nums)) != (L, K):
        raise ArchitectureError(f'error: {where} has {K} scales of {L} tokens in all, several pyramids fit that and its '
                                f'weights do not say which: pass its --pn (the side of every scale, e.g. 1_2_3_4).')
    return spec


def resolve(given: Mapping[str, Any], vae_ckpt: Optional[str], patch_size: Optional[int], argv: Sequence[str],
            init: Optional[Tuple[str, Any, Dict[str, Any]]] = None, from_var: bool = False,
            resume: Optional[Tuple[str, Dict[str, Any]]] = None, default_vae_ckpt: str = DEFAULT_VAE_CKPT
            ) -> Architecture:
    """The Architecture of a run. init: (path, file contents, transformer state dict) of --init_ckpt, or of
    --init_from_var with from_var; resume: (path, checkpoint) when the run resumes (it wins); default_vae_ckpt: the
    tokenizer of a new run without --vae_ckpt (a token cache's own)."""
    if resume is not None:
        where, ckpt = resume
        spec = ModelSpec.from_dict(ckpt['config'])
        items = contradictions(given, spec)
        if items:
            refuse(items, where, argv, (), 'resuming')
        tok = pick_tokenizer(vae_ckpt, tokenizer_of_file(ckpt, where), where, argv)
        check_patch_size(patch_size, spec, where, argv)
        return Architecture(spec, tok, where)
    if init is None:
        tok = pick_tokenizer(vae_ckpt, None, 'the flags', argv, default_vae_ckpt)
        spec = from_flags(given, tok, argv)
        check_patch_size(patch_size, spec, 'the tokenizer', argv)
        return Architecture(spec, tok, 'the flags')
    where, obj, sd = init
    if from_var and state_dict_kind(sd) != 'VAR':
        raise ArchitectureError(f'error: {where} is a VIAR checkpoint, not a VAR: pass it as --init_ckpt to fine-tune '
                                f'it.')
    file_spec = from_file(obj, sd, where, given)
    tok = pick_tokenizer(vae_ckpt, tokenizer_of_file(obj, where), where, argv)
    if not (isinstance(obj, dict) and isinstance(obj.get('config'), dict)):   # the weights do not tell these
        file_spec = ModelSpec.from_dict(dict(file_spec.to_dict(), **tokenizer_sizes(tok)))
    free, what = (VIAR_FROM_VAR_FREE, 'a VIAR started from a VAR') if from_var else (FINE_TUNE_FREE, 'a fine-tune')
    if from_var:
        default = ModelSpec()
        file_spec = replace(file_spec, use_implicit=True, pre_depth=given.get('pre_depth', default.pre_depth),
                            post_depth=given.get('post_depth', default.post_depth))
    items = contradictions(given, file_spec, free)
    if items:
        to_viar = not from_var and not file_spec.use_implicit and given.get('use_implicit')
        refuse(items, where, argv, free, what, ' To start a VIAR from this VAR, pass the file as --init_from_var '
                                                'instead.' if to_viar else '')
    spec = replace(file_spec, **{k: v for k, v in given.items() if k in free})
    check_patch_size(patch_size, spec, where, argv)
    return Architecture(spec, tok, where, init_sd=dict(sd))
