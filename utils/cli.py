"""Command lines generated from config dataclasses: one flag per field, typed from its annotation.

Fields made with `flag(default, help)` become argparse flags (`add_dataclass_args`; official names kept,
aliases allowed) and the parsed flags become the dataclass again (`from_namespace`). `parse_explicit` also
reports which flags the user typed, so a checkpoint may replace an untouched default but not a typed flag.
"""
import argparse
import dataclasses
import functools
import sys
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from utils.atomic import WriteError

_TRUE = {'1', 'true', 't', 'yes', 'y', 'on'}
_FALSE = {'0', 'false', 'f', 'no', 'n', 'off'}


def flag(default, help: str, aliases: Sequence[str] = (), choices: Optional[Sequence] = None,
         metavar: Optional[str] = None, name: Optional[str] = None, parse=None):
    """A dataclass field that carries its CLI help (and optional flag aliases, choices; `name`: the flag's
    spelling when it is not --<field>; `parse`: the argparse type when the annotation's is not the one)."""
    meta = dict(help=help, aliases=tuple(aliases), choices=choices, metavar=metavar, name=name, parse=parse)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def exits_on_write_error(main):
    """An entry point's main() whose failed writes (utils.atomic.WriteError: a full disk, a read-only folder) end
    the process with their one line and exit code 1, not a traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except WriteError as e:
            raise SystemExit(f'error: {e}') from None
    return run


def str2bool(value) -> bool:
    """'True'/'false'/'1'/'no'... -> bool; used with nargs='?' so a bare flag means True."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (True/False, 1/0, yes/no), got {value!r}')


BOOL_FLAG = dict(type=str2bool, nargs='?', const=True, metavar='BOOL')   # argparse kwargs of every boolean flag


class ValueTypeError(argparse.ArgumentTypeError, ValueError):
    """A flag value that does not parse: argparse prints its message, Python callers catch a ValueError."""


def int_tuple(text: str) -> tuple:
    """'1,2,3,4' or '1_2_3_4' -> (1, 2, 3, 4): the one parser of integer lists."""
    try:
        return tuple(int(t) for t in str(text).replace('_', ',').split(',') if t.strip())
    except ValueError:
        raise ValueTypeError(f'expected comma-separated integers like 1,2,3,4, got {text!r}') from None


def add_bool_arg(parser, name: str, default: bool = False, help: str = ''):
    """A boolean flag accepting `--name`, `--name True` and `--name False`."""
    parser.add_argument(name, default=default, help=help, **BOOL_FLAG)


def _unoptional(tp):
    """Optional[X] -> X; anything else unchanged."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _arg_kwargs(f: dataclasses.Field, tp) -> Dict[str, Any]:
    """argparse keyword arguments for one field of type `tp`."""
    tp = _unoptional(tp)
    meta = f.metadata
    if tp is bool:
        kw = dict(BOOL_FLAG)
    elif tp in (int, float, str):
        kw = dict(type=tp)
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (int,):
        kw = dict(type=int_tuple, metavar='1,2,...')
    elif typing.get_origin(tp) is list and typing.get_args(tp) in ((int,), (float,), (str,)):
        kw = dict(type=typing.get_args(tp)[0], nargs='+')
    else:
        raise TypeError(f'no CLI type for field {f.name}: {tp}')
    if meta.get('parse'):
        kw['type'] = meta['parse']
    kw.update({key: meta[key] for key in ('choices', 'metavar') if meta.get(key)})
    return kw


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f'field {f.name} has no default')


def add_dataclass_args(parser, clz, title: Optional[str] = None, only: Optional[Iterable[str]] = None,
                       skip: Iterable[str] = (), defaults: Optional[Dict[str, Any]] = None):
    """Add one flag per field of `clz` (those in `only`, minus `skip`) as an argument group, from the fields'
    `flag(...)` metadata; `defaults` overrides field defaults for this script. Returns the group."""
    g = parser.add_argument_group(title or clz.__name__, clz.__doc__)
    hints = typing.get_type_hints(clz)
    only = set(only) if only is not None else None
    defaults = defaults or {}
    for f in dataclasses.fields(clz):
        if f.name in skip or (only is not None and f.name not in only) or f.metadata.get('cli') is False:
            continue
        default = defaults.get(f.name, _default_of(f))
        g.add_argument(f.metadata.get('name') or f'--{f.name}', *f.metadata.get('aliases', ()), dest=f.name,
                       default=default, help=f.metadata.get('help', ''), **_arg_kwargs(f, hints[f.name]))
    return g


def parse_dataclass(clz, argv: Optional[List[str]], description: str, title: str):
    """An instance of `clz` from the command line of a script whose flags are its fields (argv=None: sys.argv)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(p, clz, title)
    return from_namespace(clz, p.parse_args(argv))


def from_namespace(clz, ns: argparse.Namespace, **overrides):
    """An instance of `clz` from the parsed flags; fields the parser did not add keep their defaults."""
    vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(clz)
            if hasattr(ns, f.name) and f.metadata.get('cli') is not False}
    vals.update(overrides)
    return clz(**vals)


def from_dict(clz, d: Dict[str, Any]):
    """Inverse of dataclasses.asdict for a flat dataclass: unknown keys dropped, lists back to tuples."""
    hints = typing.get_type_hints(clz)
    vals = {}
    for f in dataclasses.fields(clz):
        if f.name in d:
            v = d[f.name]
            if isinstance(v, list) and typing.get_origin(_unoptional(hints[f.name])) is tuple:
                v = tuple(v)
            vals[f.name] = v
    return clz(**vals)


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> Set[str]:
    """The dests of the flags typed on the command line (defaults not counted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:   # a copy of every optional flag whose default is 'absent'
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kw = dict(dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kw['action'] = 'store_true'
            else:
                kw.update(nargs=action.nargs, const=action.const)
            probe.add_argument(*action.option_strings, **kw)
    seen, _ = probe.parse_known_args(argv)
    return set(vars(seen))


def parse_explicit(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None
                   ) -> Tuple[argparse.Namespace, Set[str]]:
    """(parsed namespace, dests the user typed)."""
    ns = parser.parse_args(argv)
    return ns, explicit_dests(parser, argv)

