"""Sharded training checkpoints (`train.py --fsdp`): one folder per save, written by every rank, resumable at any
world size, kept two at a time (layout, refusal and retention rules: docs/TRAINING.md, FSDP).

`ar-ckpt-step<step:08d>/` holds each rank's `__<rank>_0.distcp` shards (torch.distributed.checkpoint), DCP's
`.metadata` (read only with utils.checkpoint.read_dcp_metadata), rank 0's plain `state.pth`, and `complete.json`,
written last with each file's size: a folder without it, or with a file missing or resized, is refused.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import dist
from utils.atomic import write_json_atomic
from utils.checkpoint import CheckpointError, read_checkpoint, read_dcp_metadata, save_atomic

MARKER = 'complete.json'
STATE = 'state.pth'
METADATA = '.metadata'
FORMAT = 'viar-sharded-1'
KEEP = 2
_NAME = re.compile(r'^ar-ckpt-step(\d{8})$')


class IncompleteCheckpoint(Exception):
    """A sharded checkpoint folder that cannot be used; the message names the file."""


def folder_name(step: int) -> str:
    """The folder of the checkpoint taken after `step` forward passes."""
    return f'ar-ckpt-step{step:08d}'


@dataclass(frozen=True)
class Entry:
    """One checkpoint folder as the retention rule sees it."""
    step: int
    complete: bool
    best: bool = False


def stale(entries: Sequence[Entry], keep: int = KEEP) -> List[int]:
    """Steps whose folders go: complete ones older than the newest `keep` complete ones (except the newest complete
    best one), and incomplete ones older than the newest complete one (a save still being written stays)."""
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.step, reverse=True)
    kept = {e.step for e in complete[:keep]}
    bests = [e for e in complete if e.best]
    if bests:
        kept.add(bests[0].step)
    newest = complete[0].step if complete else None
    out = [e.step for e in complete if e.step not in kept]
    out += [e.step for e in entries if not e.complete and newest is not None and e.step < newest]
    return sorted(out)


def read_marker(folder: str) -> Dict[str, Any]:
    """The marker of a folder; IncompleteCheckpoint naming it when it is missing or unreadable."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        raise IncompleteCheckpoint(f'{path} is missing: the save did not finish')
    try:
        with open(path) as f:
            marker = json.load(f)
        if marker.get('format') != FORMAT or not isinstance(marker.get('files'), dict):
            raise ValueError('not a marker this trainer writes')
        return marker
    except (OSError, ValueError) as e:
        raise IncompleteCheckpoint(f'{path} cannot be read ({e})') from None


def check_folder(folder: str) -> Tuple[Dict[str, Any], Any]:
    """(marker, DCP metadata) of a complete folder; IncompleteCheckpoint names the first file that is missing,
    resized, or not what this trainer writes."""
    marker = read_marker(folder)
    marker_path, meta_path = os.path.join(folder, MARKER), os.path.join(folder, METADATA)
    for name, size in sorted(marker['files'].items()):
        path = os.path.join(folder, name)
        if os.path.basename(name) != name:
            raise IncompleteCheckpoint(f'{marker_path} lists {name!r}, not a file of the folder')
        if not os.path.isfile(path):
            raise IncompleteCheckpoint(f'{path} is missing')
        if os.path.getsize(path) != size:
            raise IncompleteCheckpoint(f'{path} has {os.path.getsize(path)} bytes, the save wrote {size}')
    try:
        md = read_dcp_metadata(meta_path)
    except CheckpointError as e:   # also a hostile file (UnsafeCheckpointError): refused, never unpickled fully
        raise IncompleteCheckpoint(str(e)) from None
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata   # 0.3 s to import: --fsdp runs only
    odd = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if odd:
        raise IncompleteCheckpoint(f'{meta_path} lists non-tensor entries ({odd[0]}, ...): not a checkpoint this '
                                   f'trainer writes')
    shards = {info.relative_path for info in md.storage_data.values()}
    unlisted = sorted(shards - set(marker['files']))
    if unlisted:
        raise IncompleteCheckpoint(f'{meta_path} points at {unlisted[0]}, which {marker_path} does not list')
    return marker, md


def folders(out: str) -> List[Tuple[int, str]]:
    """(step, path) of every checkpoint folder in `out`, newest first."""
    if not os.path.isdir(out):
        return []
    found = [(_NAME.match(e.name), e.path) for e in os.scandir(out) if e.is_dir()]
    return sorted(((int(m.group(1)), p) for m, p in found if m), reverse=True)


def newest_complete(out: str, warn: Callable[[str], None]) -> Optional[Tuple[int, str, Any]]:
    """(step, folder, DCP metadata) of the newest complete folder; newer incomplete ones are skipped, each `warn`ed."""
    for step, folder in folders(out):
        try:
            return step, folder, check_folder(folder)[1]
        except IncompleteCheckpoint as e:
            warn(f'[ckpt] refusing {folder}: {e}; using an earlier checkpoint')
    return None


def read_state(folder: str) -> Dict[str, Any]:
    """The plain part of a checked folder (read_checkpoint: weights only)."""
    try:
        return read_checkpoint(os.path.join(folder, STATE))
    except CheckpointError as e:
        raise SystemExit(f'cannot resume from {folder}: {e}') from None


def save(out: str, step: int, tensors: Dict[str, Any], plain: Optional[Dict[str, Any]], best: bool,
         log: Callable[[str], None]) -> str:
    """Every rank: write the folder of `step` (tensors: this rank's shards; plain: rank 0's dict), then the marker,
    then prune; returns the folder."""
    folder = os.path.join(out, folder_name(step))
    if dist.is_master() and os.path.isdir(folder):   # a save of this step killed before its marker
        shutil.rmtree(folder)
    dist.barrier()
    dist.dcp_save(tensors, folder)
    dist.barrier()
    if dist.is_master():
        save_atomic(plain, os.path.join(folder, STATE))
        files = {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file() and e.name != MARKER}
        write_json_atomic(dict(format=FORMAT, step=step, world_size=dist.get_world_size(), best=best, files=files),
                          os.path.join(folder, MARKER))
        prune(out, log)
    dist.barrier()
    return folder


def prune(out: str, log: Callable[[str], None]):
    """Delete the folders the retention rule (`stale`) names."""
    entries = []
    for step, folder in folders(out):
        try:
            marker = read_marker(folder)
            entries.append(Entry(step, True, bool(marker.get('best'))))
        except IncompleteCheckpoint:
            entries.append(Entry(step, False))
    for step in stale(entries):
        shutil.rmtree(os.path.join(out, folder_name(step)), ignore_errors=True)
        log(f'[ckpt] removed {folder_name(step)} (keeping the newest {KEEP} complete checkpoints and the best)')


def optim_by_name(osd: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """An optimizer state dict keyed by parameter index (as DDP checkpoints hold it) re-keyed by parameter name;
    names[i]: the parameter of index i (the order of the optimizer's param groups)."""
    groups = [dict(g, params=[names[i] for i in g['params']]) for g in osd['param_groups']]
    return {'state': {names[i]: v for i, v in osd['state'].items()}, 'param_groups': groups}
