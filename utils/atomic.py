"""Atomic file writes: write under a temporary name in the same folder, fsync, then rename.

A crash (or a full disk) leaves either the old file or the new one, never a half-written file with
the final name. Every writer of results, checkpoints, images and reports in the project goes
through `atomic_path`.
"""
import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def _fsync_dir(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:   # some filesystems refuse fsync on a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block succeeds it is fsynced and renamed onto `path`.

    On an exception the temporary file is removed and `path` is untouched. durable=False skips the
    fsyncs (many small files that can be remade, e.g. sample PNGs; the rename stays atomic).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(folder)


def write_json_atomic(obj: Any, path: str, indent: int = 2):
    """json.dump to `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=indent)


def is_temp_name(name: str) -> bool:
    """True for the temporary files atomic_path makes (left behind only by a killed process)."""
    return name.startswith('.') and name.endswith('.tmp')
