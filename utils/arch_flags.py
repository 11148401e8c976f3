"""The architecture flags of train.py and of the sampling scripts, generated from models.config.ModelSpec.

`SPELLING` says how a field's flag is spelled where that is not `--<field>` (official spellings first, the
others kept as aliases); `--p_depth` (official) sets `--pre_depth` and `--post_depth` together. Every flag
defaults to None, 'not given': the value then comes from the checkpoint, else from ModelSpec.
"""
import argparse
import dataclasses
import re
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from models.config import ModelSpec, field_names, spec_of_model
from models.layout import PYRAMIDS
from utils import cli
from utils.cli import flag

# ModelSpec field -> (flag, aliases): only where the flag is not --<field>
SPELLING = {'embed_dim': ('--width', '--embed_dim'), 'num_heads': ('--heads', '--num_heads'),
            'patch_nums': ('--pn', '--patch_nums'), 'vae_ch': ('--vae_ch', '--vch'),
            'shared_aln': ('--saln', '--shared_aln'), 'attn_l2_norm': ('--anorm', '--attn_l2_norm')}
PN_SHORTCUTS = {str(px): pn for px, pn in PYRAMIDS.items()}


def parse_pn(text: str) -> Tuple[int, ...]:
    """--pn: a shortcut ('256', '512', '1024') or the sides joined by '_', ',' or '-' ('1_2_3')."""
    if str(text) in PN_SHORTCUTS:
        return PN_SHORTCUTS[str(text)]
    try:
        return cli.int_tuple(str(text).replace('-', '_'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--pn must be sides like 1_2_3_4_5_6_8_10_13_16 (or 256/512/1024), '
                                         f'got {text!r}') from None


def flag_name(field: str) -> str:
    """The flag that sets a ModelSpec field ('--width' for embed_dim)."""
    return SPELLING.get(field, (f'--{field}',))[0]


def format_value(value: Any) -> str:
    """A value as its flag takes it: pyramids and multipliers joined by '_'."""
    if isinstance(value, (tuple, list)):
        return '_'.join(map(str, value))
    return str(value)


def _arch_flag(f: dataclasses.Field, hint) -> Tuple[str, Any, dataclasses.Field]:
    spelling = SPELLING.get(f.name, (f'--{f.name}',))
    fallback = '' if f.default is None else f', else {format_value(f.default)}'
    text = f"{f.metadata['doc']} (default: the checkpoint's{fallback})"
    metavar = spelling[0][2:].upper() if hint in (int, float, str) or hint == Optional[int] else None
    return f.name, Optional[hint], flag(None, text, aliases=spelling[1:], name=spelling[0], metavar=metavar,
                                        parse=parse_pn if f.name == 'patch_nums' else None)


ArchFlags = dataclasses.make_dataclass(
    'ArchFlags',
    [_arch_flag(f, typing.get_type_hints(ModelSpec)[f.name]) for f in dataclasses.fields(ModelSpec)]
    + [('p_depth', Optional[int], flag(None, 'VIAR: --pre_depth and --post_depth together (the official flag)'))],
    namespace=dict(__doc__='A checkpoint (--init_ckpt, --init_from_var, a resume, --var_ckpt) sets the '
                                   'architecture: flags given must agree with it.'))


def add_arch_args(parser: argparse.ArgumentParser, title: str = 'architecture', skip: Iterable[str] = ()):
    """The architecture flags (but those in `skip`) as one argument group; a flag not given leaves no value (ArchFlags
    keeps None)."""
    return cli.add_dataclass_args(parser, ArchFlags, title, skip=skip,
                                  defaults={f.name: argparse.SUPPRESS for f in dataclasses.fields(ArchFlags)})


def check_spec(spec: ModelSpec):
    """spec.validate() with the fix in flags: each field it names as the flag that sets it (ValueError)."""
    try:
        spec.validate()
    except ValueError as e:
        text = re.sub(r'\b(' + '|'.join(field_names()) + r')\b', lambda m: flag_name(m[1]), str(e))
        if 'pre_depth' in str(e):   # train.py sets both with the official --p_depth
            text += '; with --p_depth: 2 * --p_depth < --depth'
        raise ValueError(text) from None


def given_fields(ns: Any) -> Dict[str, Any]:
    """ModelSpec field -> value for every architecture flag given (parsed namespace or ArchFlags); --p_depth fills
    --pre_depth and --post_depth where they are not given themselves."""
    out = {name: getattr(ns, name) for name in field_names() if getattr(ns, name, None) is not None}
    p = getattr(ns, 'p_depth', None)
    if p is not None:
        out.setdefault('pre_depth', p)
        out.setdefault('post_depth', p)
    return out


def flag_text(field: str, value: Any) -> str:
    """'--width 256' for (embed_dim, 256)."""
    return f'{flag_name(field)} {format_value(value)}'


def flags_to_build(spec: ModelSpec, against: Optional[ModelSpec] = None) -> str:
    """The flags that build `spec`: its depth and kind (and a VIAR's block counts), then every field whose value
    differs from `against`'s (the spec defaults when None)."""
    ref = against or ModelSpec()
    names = ['depth', 'use_implicit'] + (['pre_depth', 'post_depth'] if spec.use_implicit else [])
    names += [n for n in field_names() if n not in names and spec.value(n) != ref.value(n)]
    return ' '.join(flag_text(n, spec.value(n)) for n in names if spec.value(n) is not None)


def contradictions(given: Mapping[str, Any], spec: ModelSpec, free: Iterable[str] = ()) -> List[Tuple[str, Any, Any]]:
    """(field, given value, the spec's value) for every given field (outside `free`) that would change `spec`."""
    out = []
    for name, value in given.items():
        if name in free:
            continue
        changed = dataclasses.replace(spec, **{name: value})
        if changed.value(name) != spec.value(name) or changed.differences(spec):
            out.append((name, value, spec.value(name)))
    return out


def contradiction_text(items: List[Tuple[str, Any, Any]], where: str) -> str:
    """'--width 128 (FILE: 256), --pn 1_2_3 (FILE: 1_2_3_4)'."""
    return ', '.join(f'{flag_text(n, mine)} ({where}: {format_value(theirs)})' for n, mine, theirs in items)


def describe_spec(spec: ModelSpec) -> str:
    """The one description of an architecture, in logs and messages: 'VIAR depth 6 (1 pre + implicit + 1 post),
    width 256, 4 heads, 4 scales, 10 classes'."""
    blocks = f' ({spec.pre_depth} pre + implicit + {spec.post_depth} post)' if spec.use_implicit else ''
    extra = ', shared AdaLN' if spec.shared_aln else ''
    return (f'{spec.kind} depth {spec.depth}{blocks}, width {spec.width}, {spec.heads} heads{extra}, '
            f'{len(spec.patch_nums)} scales, {spec.num_classes} classes')


def describe_model(var) -> str:
    """describe_spec of a built VAR/VIAR."""
    return describe_spec(spec_of_model(var))
