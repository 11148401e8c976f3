"""Start a training run from trained weights: `--init_ckpt` (fine-tuning), `--init_from_var` (VIAR from a VAR), `--freeze`.

Shapes: N classes of the file, M classes of this run, C width.

Only the weights are taken, never the optimizer, the step or the schedule: a fine-tune is a new run. A run
that finds `ar-ckpt-last.pth` resumes from it instead (train.py decides that), so a killed fine-tune continues.

- `--init_ckpt PATH`: an official file (a name the checkpoint helper downloads), an `ar-ckpt-*.pth` or a slim
  export. Every tensor must fit the model these flags build, except the class rows of `class_emb`: with
  another number of classes they are re-initialised (this run's fresh init) and the file's learned null-class
  row (row N, the unconditional embedding classifier-free guidance uses) becomes the new last row (row M).
  A file of another resolution (`pos_1LC` of another length) is refused: positions are never interpolated.
- `--init_from_var PATH` (VIAR only): pre-blocks from the VAR's first p blocks, post-blocks from its last p,
  the implicit block from its block depth // 2 (the block the implicit one is built like), embeddings, AdaLN
  and head from the VAR; the input-injection projection keeps its fresh init.
- `--freeze PATTERNS`: comma-separated fnmatch patterns over parameter names, applied in order; a pattern
  starting with '!' unfreezes what it matches (`*,!implicit_block.*,!class_emb.*` trains only those two).

The arithmetic (name mappings, class rows, pattern matching) is in pure functions; `initialise` and
`apply_freeze` apply them to a built model and log what they did.
"""
import fnmatch
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.config import ModelSpec, spec_from_state_dict, state_dict_kind, var_to_viar_names
from models.layout import PYRAMIDS, num_tokens

# ModelSpec field -> the train.py flag that sets it (for "these flags load it")
TRAIN_FLAGS = dict(depth='depth', use_implicit='use_implicit', pre_depth='p_depth', post_depth='p_depth',
                   embed_dim='width', num_heads='heads', V='V', Cvae='Cvae', shared_aln='saln', attn_l2_norm='anorm',
                   patch_nums='pn')
# what a VAR and the VIAR it initialises must share
SHARED_WITH_VAR = ('embed_dim', 'num_heads', 'V', 'Cvae', 'shared_aln', 'attn_l2_norm', 'patch_nums')


class InitError(SystemExit):
    """Weights that cannot start this run; the message says what the file is and which flags fit it."""


# ---------------------------------------------------------------- pure pieces

def adapt_class_emb(file_NC: torch.Tensor, init_MC: torch.Tensor) -> torch.Tensor:
    """(M + 1, C) class embedding: the file's rows when the class counts agree, else this run's initial class rows
    0..M-1 with the file's null-class row (its last) as the new last row, on the model's device and in its dtype
    (the file is read onto the CPU, the model may already sit on a GPU)."""
    if file_NC.shape == init_MC.shape:
        return file_NC
    if file_NC.shape[1] != init_MC.shape[1]:
        raise ValueError(f'class embedding width {file_NC.shape[1]} != {init_MC.shape[1]}')
    return torch.cat([init_MC[:-1], file_NC[-1:].to(init_MC)], dim=0)


def pyramid_text(patch_nums: Sequence[int]) -> str:
    """'256 px (--pn 256: 680 tokens)' for an official pyramid, else its sides and token count."""
    for px, pn in PYRAMIDS.items():
        if tuple(patch_nums) == pn:
            return f'the {px} px pyramid (--pn {px}: {num_tokens(pn)} tokens)'
    sides = '_'.join(map(str, patch_nums))
    return f'the pyramid --pn {sides} ({num_tokens(patch_nums)} tokens)'


def file_pyramid_text(sd: Mapping[str, torch.Tensor]) -> str:
    """The pyramid a state dict was trained on, from its pos_1LC length (and its number of scales)."""
    L, K = sd['pos_1LC'].shape[1], sd['lvl_embed.weight'].shape[0]
    for pn in PYRAMIDS.values():
        if len(pn) == K and num_tokens(pn) == L:
            return pyramid_text(pn)
    return f'a pyramid of {K} scales and {L} tokens'


def resolution_mismatch(sd: Mapping[str, torch.Tensor], patch_nums: Sequence[int], where: str) -> Optional[str]:
    """The refusal for a file whose position embeddings are for another pyramid; None when they fit."""
    if 'pos_1LC' not in sd or 'lvl_embed.weight' not in sd:
        return None
    if sd['pos_1LC'].shape[1] == num_tokens(patch_nums) and sd['lvl_embed.weight'].shape[0] == len(patch_nums):
        return None
    return (f'{where} was trained on {file_pyramid_text(sd)}, but this run trains {pyramid_text(patch_nums)}: its '
            f'position embeddings (pos_1LC, lvl_embed) do not fit and are not interpolated. Fine-tune at the '
            f"file's resolution (its --pn), or train this resolution from scratch.")


def flag_text(name: str, value) -> str:
    """One train.py flag for a ModelSpec field value."""
    if name == 'patch_nums':
        return f'--pn {"_".join(map(str, value))}'
    return f'--{TRAIN_FLAGS[name]} {value}'


def fit_message(file_spec: ModelSpec, run_spec: ModelSpec, where: str, fields: Sequence[str]) -> Optional[str]:
    """'this file is X, these flags load it' for every field in `fields` that differs; None when none does."""
    diffs = [(n, a) for n, a, _ in file_spec.differences(run_spec, fields) if n in TRAIN_FLAGS]
    if not diffs:
        return None
    flags = ' '.join(dict.fromkeys(flag_text(n, a) for n, a in diffs))   # p_depth once for pre and post
    hint = ''
    if file_spec.kind == 'VAR' and run_spec.kind == 'VIAR':
        hint = ' To start this VIAR from that VAR, pass it as --init_from_var instead.'
    return (f'{where} is {file_spec.summary()}, but these flags build {run_spec.summary()}. Train with {flags} to '
            f'fine-tune it.{hint}')


def span(a: int, b: int) -> str:
    """Block indices a..b-1 for a log line: '3' or '0..4'."""
    return str(a) if b - a == 1 else f'{a}..{b - 1}'


def freeze_mask(names: Sequence[str], patterns: Sequence[str]) -> Dict[str, bool]:
    """name -> frozen, applying the fnmatch patterns in order ('!pattern' unfreezes). A pattern that matches no
    name raises ValueError (a typo would otherwise train everything)."""
    frozen = {n: False for n in names}
    for raw in patterns:
        pat = raw.strip()
        if not pat:
            continue
        unfreeze = pat.startswith('!')
        pat = pat[1:] if unfreeze else pat
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f'--freeze pattern {raw!r} matches no parameter')
        for n in hits:
            frozen[n] = not unfreeze
    return frozen


def parse_patterns(text: str) -> List[str]:
    """'a.*, !b.*' -> ['a.*', '!b.*']."""
    return [p.strip() for p in (text or '').split(',') if p.strip()]


# ---------------------------------------------------------------- applying them to a model

def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(transformer state dict, where) of an official file, an ar-ckpt-*.pth or a slim export, through the
    checkpoint helper (official names are downloaded; files are read without running code)."""
    from utils.checkpoint import CheckpointError, extract_state_dict, read_checkpoint, resolve_checkpoint
    try:
        resolved = resolve_checkpoint(path)
        sd = extract_state_dict(read_checkpoint(resolved), path)
    except CheckpointError as e:
        raise InitError(str(e)) from None
    kind = state_dict_kind(sd)
    if kind == 'vae':
        raise InitError(f'{path} is a VQVAE tokenizer file; pass it as --vae_ckpt. --init_ckpt and --init_from_var '
                        f'take transformer weights (var_d*.pth, viar.pth, ar-ckpt-*.pth, *-slim.pth).')
    if kind == 'unknown':
        raise InitError(f'{path} holds no VAR/VIAR weights (no class_emb.weight); pass a transformer checkpoint.')
    return sd, path


def load_init_ckpt(var: nn.Module, run_spec: ModelSpec, sd: Mapping[str, torch.Tensor], where: str,
                   log: Callable[[str], None]) -> Dict[str, str]:
    """Load a fine-tuning start into `var` (strictly, through the checkpoint helper); returns what was done."""
    from utils.checkpoint import CheckpointError, load_var_weights
    msg = resolution_mismatch(sd, run_spec.patch_nums, where)
    if msg:
        raise InitError(msg)
    file_spec = spec_from_state_dict(sd, run_spec)
    msg = fit_message(file_spec, run_spec, where,
                      ('use_implicit', 'depth', 'pre_depth', 'post_depth', 'embed_dim', 'num_heads', 'V', 'Cvae',
                       'shared_aln', 'attn_l2_norm', 'patch_nums'))
    if msg:
        raise InitError(msg)
    sd = dict(sd)
    done = {}
    own = var.state_dict()['class_emb.weight']
    if sd['class_emb.weight'].shape != own.shape:
        sd['class_emb.weight'] = adapt_class_emb(sd['class_emb.weight'], own)
        done['class_emb'] = (f'{file_spec.num_classes} classes in the file, {run_spec.num_classes} in this run: '
                             f'class rows re-initialised, the learned null-class row kept as row {run_spec.num_classes}')
        log(f'[init] {done["class_emb"]}')
    try:
        load_var_weights(var, sd, where=where)
    except CheckpointError as e:
        raise InitError(str(e)) from None
    return done


def load_init_from_var(viar: nn.Module, run_spec: ModelSpec, sd: Mapping[str, torch.Tensor], where: str,
                       log: Callable[[str], None]) -> Dict[str, str]:
    """Initialise a VIAR from a VAR's weights (mapping of the module docstring); returns what was done."""
    if state_dict_kind(sd) != 'VAR':
        raise InitError(f'{where} is a VIAR checkpoint, not a VAR: pass it as --init_ckpt to fine-tune it.')
    msg = resolution_mismatch(sd, run_spec.patch_nums, where)
    if msg:
        raise InitError(msg)
    file_spec = spec_from_state_dict(sd, run_spec)
    msg = fit_message(file_spec, run_spec, where, SHARED_WITH_VAR)
    if msg:
        raise InitError(msg.replace(' to fine-tune it.', ' to initialise this VIAR from it.'))
    own = viar.state_dict()
    try:
        names = var_to_viar_names(list(own), file_spec.depth, run_spec.pre_depth, run_spec.post_depth)
    except ValueError as e:
        raise InitError(f'{where}: {e}; lower --p_depth.') from None
    new = {}
    for key, src in names.items():
        if src is None:
            new[key] = own[key]
        elif key == 'class_emb.weight':
            new[key] = adapt_class_emb(sd[src], own[key])
        elif src not in sd or sd[src].shape != own[key].shape:
            raise InitError(f'{where} has no tensor {src} of shape {tuple(own[key].shape)} for {key}: '
                            f'it is {file_spec.summary()}, not a VAR this VIAR can start from.')
        else:
            new[key] = sd[src]
    viar.load_state_dict(new, strict=True)
    d, p, q = file_spec.depth, run_spec.pre_depth, run_spec.post_depth
    done = dict(pre=f'pre_blocks.{span(0, p)} <- blocks.{span(0, p)}' if p else 'no pre-blocks',
                implicit=f'implicit_block <- blocks.{d // 2}',
                post=f'post_blocks.{span(0, q)} <- blocks.{span(d - q, d)}' if q else 'no post-blocks',
                rest='embeddings, AdaLN and head from the VAR; implicit_block_projection: fresh init')
    log(f'[init] VIAR from VAR depth {d} ({where}): ' + '; '.join(done.values()))
    if file_spec.num_classes != run_spec.num_classes:
        done['class_emb'] = (f'{file_spec.num_classes} classes in the file, {run_spec.num_classes} in this run: '
                             f'class rows re-initialised, the learned null-class row kept as row {run_spec.num_classes}')
        log(f'[init] {done["class_emb"]}')
    return done


def check_init_flags(init_ckpt: str, init_from_var: str, use_implicit: bool):
    """The flag combinations --init_ckpt / --init_from_var cannot serve: one line that says what to pass."""
    if init_ckpt and init_from_var:
        raise InitError('give --init_ckpt (fine-tune a model of the same kind) or --init_from_var (a VIAR from a '
                        'VAR), not both.')
    if init_from_var and not use_implicit:
        raise InitError('--init_from_var initialises a VIAR: add --use_implicit True, or pass the VAR file as '
                        '--init_ckpt to fine-tune it as a VAR.')


def initialise(var: nn.Module, run_spec: ModelSpec, init_ckpt: str, init_from_var: str,
               log: Callable[[str], None]) -> Dict[str, str]:
    """Apply --init_ckpt or --init_from_var (at most one) to a freshly built model, on every rank.

    The local master resolves (downloads) an official name first; the other ranks then read the same file.
    """
    import dist
    check_init_flags(init_ckpt, init_from_var, run_spec.use_implicit)
    path = init_ckpt or init_from_var
    if not path:
        return {}
    if dist.is_local_master():
        from utils.checkpoint import CheckpointError, resolve_checkpoint
        try:
            resolve_checkpoint(path)
        except CheckpointError:
            pass   # every rank reports it below
    dist.barrier()
    sd, where = read_weights(path)
    if init_ckpt:
        done = load_init_ckpt(var, run_spec, sd, where, log)
        log(f'[init] weights from {where} (weights only: the optimizer, step and schedule start afresh)')
        return done
    return load_init_from_var(var, run_spec, sd, where, log)


def apply_freeze(model: nn.Module, patterns_text: str, log: Callable[[str], None]) -> Tuple[int, int]:
    """Freeze the parameters --freeze selects; logs and returns (trained, total) parameter counts."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    patterns = parse_patterns(patterns_text)
    if not patterns:
        return total, total
    try:
        mask = freeze_mask([n for n, _ in named], patterns)
    except ValueError as e:
        tops = sorted({n.split('.')[0] for n, _ in named})
        raise InitError(f'{e}; parameter names start with {", ".join(tops)} (e.g. implicit_block.*).') from None
    for n, p in named:
        p.requires_grad_(not mask[n])
    trained = sum(p.numel() for n, p in named if not mask[n])
    if trained == 0:
        raise InitError(f'--freeze {patterns_text!r} freezes every parameter: nothing would be trained. '
                        f'Unfreeze some with !pattern, e.g. --freeze "*,!implicit_block.*".')
    kept = sorted({n.split('.')[0] for n, _ in named if not mask[n]})
    log(f'[freeze] training {trained / 1e6:.3f}M of {total / 1e6:.3f}M parameters ({100 * trained / total:.1f}%): '
        f'{", ".join(kept)}')
    return trained, total
