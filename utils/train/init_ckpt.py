"""Start a training run from trained weights: `--init_ckpt` (fine-tuning), `--init_from_var` (VIAR from a VAR), `--freeze`.

Shapes: N classes of the file, M classes of this run, C width.

Only the weights are taken, never the optimizer, the step or the schedule; the file sets the architecture, so its
tensors fit (utils/train/architecture.py). The rules (class rows, the VAR -> VIAR block map, freeze patterns) are in
docs/TRAINING.md, "Fine-tuning and starting VIAR from VAR"; the arithmetic is in pure functions, and `initialise`
and `apply_freeze` apply them to a built model and log what they did.
"""
import fnmatch
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.config import ModelSpec, spec_from_state_dict, var_to_viar_names
from utils.checkpoint import CheckpointError, load_var_weights, read_model, transformer_state_dict


class InitError(SystemExit):
    """Weights that cannot start this run; the message says what the file is and what to pass instead."""


def adapt_class_emb(file_NC: torch.Tensor, init_MC: torch.Tensor) -> torch.Tensor:
    """(M + 1, C) class embedding: the file's rows when the class counts agree, else this run's initial rows 0..M-1
    and the file's null-class row (its last) as the last, on the model's device and dtype (the file is on the CPU)."""
    if file_NC.shape == init_MC.shape:
        return file_NC
    if file_NC.shape[1] != init_MC.shape[1]:
        raise ValueError(f'class embedding width {file_NC.shape[1]} != {init_MC.shape[1]}')
    return torch.cat([init_MC[:-1], file_NC[-1:].to(init_MC)], dim=0)


def span(a: int, b: int) -> str:
    """Block indices a..b-1 for a log line: '3' or '0..4'."""
    return str(a) if b - a == 1 else f'{a}..{b - 1}'


def freeze_mask(names: Sequence[str], patterns: Sequence[str]) -> Dict[str, bool]:
    """name -> frozen, applying the fnmatch patterns (parse_patterns') in order ('!pattern' unfreezes). A pattern
    that matches no name raises ValueError (a typo would otherwise train everything)."""
    frozen = {n: False for n in names}
    for pat in patterns:
        unfreeze = pat.startswith('!')
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat[1:] if unfreeze else pat)]
        if not hits:
            raise ValueError(f'--freeze pattern {pat!r} matches no parameter')
        for n in hits:
            frozen[n] = not unfreeze
    return frozen


def parse_patterns(text: str) -> List[str]:
    """'a.*, !b.*' -> ['a.*', '!b.*']."""
    return [p.strip() for p in (text or '').split(',') if p.strip()]


def read_weights(path: str) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(file contents, transformer state dict) of any transformer source utils.checkpoint.read_model reads."""
    try:
        obj = read_model(path)
        return obj, transformer_state_dict(obj, path)
    except CheckpointError as e:
        raise InitError(str(e)) from None


def _note_class_rows(sd: Mapping[str, torch.Tensor], run_classes: int, done: Dict[str, str], log):
    """Record and log that the class rows start afresh when the file has another number of classes."""
    file_classes = sd['class_emb.weight'].shape[0] - 1   # without the null-class row
    if file_classes != run_classes:
        done['class_emb'] = (f'{file_classes} classes in the file, {run_classes} in this run: class rows '
                             f're-initialised, the learned null-class row kept as row {run_classes}')
        log(f'[init] {done["class_emb"]}')


def load_init_ckpt(var: nn.Module, run_spec: ModelSpec, sd: Mapping[str, torch.Tensor], where: str,
                   log: Callable[[str], None]) -> Dict[str, str]:
    """Load a fine-tuning start into `var` (strictly, through the checkpoint helper); returns what was done."""
    done = {}
    _note_class_rows(sd, run_spec.num_classes, done, log)
    own = var.state_dict()['class_emb.weight']
    sd = {**sd, 'class_emb.weight': adapt_class_emb(sd['class_emb.weight'], own)}
    try:
        load_var_weights(var, sd, where=where)
    except CheckpointError as e:
        raise InitError(str(e)) from None
    return done


def load_init_from_var(viar: nn.Module, run_spec: ModelSpec, sd: Mapping[str, torch.Tensor], where: str,
                       log: Callable[[str], None]) -> Dict[str, str]:
    """Initialise a VIAR from a VAR's weights (architecture.resolve checked that they are a VAR's); returns what was
    done."""
    file_spec = spec_from_state_dict(sd, run_spec)
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
                            f'it is not a VAR this VIAR can start from.')
        else:
            new[key] = sd[src]
    viar.load_state_dict(new, strict=True)
    d, p, q = file_spec.depth, run_spec.pre_depth, run_spec.post_depth
    done = dict(pre=f'pre_blocks.{span(0, p)} <- blocks.{span(0, p)}' if p else 'no pre-blocks',
                implicit=f'implicit_block <- blocks.{d // 2}',
                post=f'post_blocks.{span(0, q)} <- blocks.{span(d - q, d)}' if q else 'no post-blocks',
                rest='embeddings, AdaLN and head from the VAR; implicit_block_projection: fresh init')
    log(f'[init] VIAR from VAR depth {d} ({where}): ' + '; '.join(done.values()))
    _note_class_rows(sd, run_spec.num_classes, done, log)
    return done


def check_init_flags(init_ckpt: str, init_from_var: str, use_implicit: bool):
    """The flag combinations --init_ckpt / --init_from_var cannot serve: one line that says what to pass."""
    if init_ckpt and init_from_var:
        raise InitError('give --init_ckpt (fine-tune a model of the same kind) or --init_from_var (a VIAR from a '
                        'VAR), not both.')
    if init_from_var and not use_implicit:
        raise InitError('--init_from_var initialises a VIAR: add --use_implicit True, or pass the VAR file as '
                        '--init_ckpt to fine-tune it as a VAR.')


def initialise(var: nn.Module, run_spec: ModelSpec, init_sd: Optional[Mapping[str, torch.Tensor]], where: str,
               from_var: bool, log: Callable[[str], None]) -> Dict[str, str]:
    """Apply --init_ckpt (or, from_var, --init_from_var) to a freshly built model: the weights `init_sd` of the file
    `where`; nothing when init_sd is None (a new run)."""
    if init_sd is None:
        return {}
    if from_var:
        return load_init_from_var(var, run_spec, init_sd, where, log)
    done = load_init_ckpt(var, run_spec, init_sd, where, log)
    log(f'[init] weights from {where} (weights only: the optimizer, step and schedule start afresh)')
    return done


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
