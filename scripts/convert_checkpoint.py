"""Convert a checkpoint into a format that loads without running code.

    python scripts/convert_checkpoint.py ckpts/var_d16.pth ckpts/var_d16.safetensors     # official file
    python scripts/convert_checkpoint.py local_output/var-slim.pth var-slim.safetensors  # slim export
    python scripts/convert_checkpoint.py old/ar-ckpt-last.pth new/ar-ckpt-last.pth --i_trust_this_file

IN is read weights-only; a file whose loading would run code is fully unpickled only with --i_trust_this_file.
Its contents become plain data (`to_plain`) written as OUT: `.safetensors` for weights and configs, `.pth` for
anything (a training checkpoint with optimizer state). OUT is read back before success is reported
(docs/CHECKPOINTS.md).
"""
import argparse
import collections
import dataclasses
import enum
import os
import pathlib
import sys
from typing import Any, List, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__' and ROOT not in sys.path:   # run as a script: make the project importable
    sys.path.insert(0, ROOT)

from utils.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint, save_atomic  # noqa: E402
from utils.cli import exits_on_write_error  # noqa: E402
from utils.safetensors_io import SafetensorsLayoutError, write_safetensors  # noqa: E402

FORMATS = ('.pth', '.pt', '.safetensors')
# kept as they are: weights-only loads read these
KEPT = (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)


class ConvertError(ValueError):
    """Contents that have no plain-data form (a function, a module, an open file)."""


def to_plain(obj: Any, where: str = 'the file') -> Any:
    """obj as tensors, numbers, strings, None, lists, tuples and dicts only (what a weights-only load reads).

    numpy arrays become tensors (uint32 as int64, which torch stores fully), numpy scalars Python numbers,
    dataclasses / namespaces / named tuples dicts, enums their value, paths strings, sets sorted lists;
    torch dtypes, devices and Sizes stay. Anything else is a ConvertError.
    """
    if obj is None or isinstance(obj, KEPT):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [to_plain(v, f'{where}[{i}]') for i, v in enumerate(obj.tolist())]
        return torch.from_numpy(np.ascontiguousarray(obj.astype(np.int64) if obj.dtype == np.uint32 else obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, where)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif isinstance(obj, tuple) and hasattr(obj, '_asdict'):
        obj = dict(obj._asdict())
    elif isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):   # OrderedDict (state dicts) keeps its type: weights-only loads accept it
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[to_plain(k, where)] = to_plain(v, f'{where}[{k!r}]')
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f'{where}[{i}]') for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return sorted(to_plain(v, where) for v in obj)
    raise ConvertError(f'{where} holds a {type(obj).__module__}.{type(obj).__name__}, which has no plain-data form')


def read_input(path: str, trust: bool) -> Any:
    """IN through the loader; with trust, a refused file with full unpickling (the only place that does it)."""
    try:
        return read_checkpoint(path)
    except UnsafeCheckpointError as e:
        if not trust:
            raise SystemExit(f'error: {e}') from None
    try:
        return torch.load(path, map_location='cpu', weights_only=False)   # trusted by the user's flag
    except Exception as e:
        raise SystemExit(f'error: {path} cannot be unpickled even with full unpickling ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else ""}); it is damaged or needs code that is not '
                         f'installed here.') from None


def count_tensors(obj: Any) -> int:
    """Tensors anywhere in a nested structure."""
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, (dict, list, tuple)):
        return sum(count_tensors(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return 0


@exits_on_write_error
def main(argv: Optional[List[str]] = None) -> str:
    """Read, make plain, write, read back; returns OUT."""
    p = argparse.ArgumentParser(description='Convert a checkpoint into a format that loads without running code '
                                            '(.safetensors, or a weights-only .pth).')
    p.add_argument('IN', help='checkpoint to read (.pth / .pt / .safetensors)')
    p.add_argument('OUT', help='file to write: .safetensors (weights, slim exports) or .pth (any checkpoint)')
    p.add_argument('--i_trust_this_file', action='store_true',
                   help='read IN with full unpickling if it asks to run code; only for a file from a trusted source')
    args = p.parse_args(argv)
    src, dst = args.IN, args.OUT
    if not os.path.isfile(src):
        raise SystemExit(f'error: {src} does not exist; pass the checkpoint file to convert.')
    if not dst.endswith(FORMATS):
        raise SystemExit(f'error: OUT {dst} must end in .safetensors or .pth.')
    if os.path.abspath(src) == os.path.abspath(dst):
        raise SystemExit('error: OUT must differ from IN (the original is never overwritten).')
    try:
        plain = to_plain(read_input(src, args.i_trust_this_file))
    except CheckpointError as e:
        raise SystemExit(f'error: {e}') from None
    except ConvertError as e:
        raise SystemExit(f'error: {src}: {e}; it cannot be converted to a safe format.') from None
    try:
        write = write_safetensors if dst.endswith('.safetensors') else save_atomic   # the format OUT names
        write(plain, dst)
        back = read_checkpoint(dst)   # the proof: it loads weights-only
    except SafetensorsLayoutError as e:
        raise SystemExit(f'error: this checkpoint holds more than weights and configs ({e}); a .safetensors file '
                         f'cannot hold it. Write it as {os.path.splitext(dst)[0]}.pth, which also loads '
                         f'weights-only.') from None
    except OSError as e:
        raise SystemExit(f'error: cannot write {dst} ({e.strerror or e}); choose a folder you can write to with '
                         f'enough free space.') from None
    except CheckpointError as e:
        raise SystemExit(f'error: wrote {dst} but it does not read back ({e}).') from None
    print(f'wrote {dst}: {count_tensors(back)} tensors, {os.path.getsize(dst) / 2 ** 20:.1f} MiB; it loads '
          f'without running code.')
    return dst


if __name__ == '__main__':
    main()
