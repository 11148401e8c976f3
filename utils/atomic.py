"""Atomic file writes: write under a temporary name in the same folder, fsync, then rename.

A crash leaves the old file or the new one, never a half-written one; every writer in the project goes through
`atomic_path`. A write the user has to unblock (a full disk, a quota, a read-only folder) is a one-line
`WriteError`: the folder, the bytes needed, and that the old file is intact. Files get the umask's mode.
"""
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from typing import Any, Iterator, Optional

FULL = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded'}
DENIED = {errno.EACCES: 'permission denied', errno.EPERM: 'operation not permitted',
          errno.EROFS: 'read-only file system', errno.ENOTDIR: 'a part of the path is a file, not a folder'}
# writers that report a failed write without its OSError: torch's zip writer ('[enforce fail at
# inline_container.cc:672] . unexpected pos ...', '... file write failed') and safetensors ('... (os error 28)')
_TORCH_WRITE_FAILED = re.compile(r'unexpected pos|file write failed')
_OS_ERROR = re.compile(r'\(os error (\d+)\)')
_PROBE_BYTES = 1 << 20


class WriteError(OSError):
    """A write the user has to unblock; str() is its one line. WriteError(errno, line) keeps the OS error's errno."""

    def __str__(self) -> str:
        return self.strerror


def human_bytes(n: float) -> str:
    """'512 B', '3.2 MiB', '1.4 GiB'."""
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024:
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} TiB'


def _write_error(path: str, code: Optional[int], need: Optional[int] = None) -> Optional[WriteError]:
    """The one-line WriteError for a write of `path` that failed with errno `code` (need: the bytes it needs):
    a full disk or quota (FULL), a folder that cannot be written (DENIED); None for any other failure."""
    folder, name = os.path.split(os.path.abspath(path))
    if code in DENIED:
        fix = ('Pass another output folder' if code == errno.ENOTDIR
               else 'Make it writable or pass another output folder')
        return WriteError(code, f'cannot write into {folder}: {DENIED[code]}. {fix}.')
    if code not in FULL:
        return None
    size = f'about {human_bytes(need)}' if need else 'an unknown size'
    try:
        room = f', {human_bytes(shutil.disk_usage(folder).free)} free there'
    except OSError:
        room = ''
    kept = f'the previous {name} is intact' if os.path.exists(path) else f'no partial {name} was left'
    return WriteError(code, f'{FULL[code]} in {folder}: writing {name} needs {size}{room}; {kept}. Free some space '
                            f'(or write to another folder) and run the command again.')


def _fsync_dir(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:   # some filesystems refuse fsync on a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _new_temp(path: str) -> str:
    """A new empty temporary file beside `path`, made with mode 0666 so that the umask applies (tempfile.mkstemp
    makes 0600 files: teammates could not read the results)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f'.{name}.{secrets.token_hex(4)}.tmp')
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _probe_errno(tmp: str) -> Optional[int]:
    """The errno of writing 1 MiB more into `tmp` (ENOSPC on a full disk), None when it fits: asked when a writer
    reported a failed write without its OSError (torch's 'unexpected pos')."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(_PROBE_BYTES >> 16):   # a short write is followed by one that fails
                os.write(fd, bytes(1 << 16))
            os.fsync(fd)   # network filesystems report a full disk here
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno
    return None


def _errno_of(e: BaseException, tmp: str) -> Optional[int]:
    """The OS error behind a failed write into `tmp`, also when the writer wrapped it in another exception."""
    if isinstance(e, OSError):
        return e.errno
    if not isinstance(e, Exception):   # KeyboardInterrupt, SystemExit
        return None
    m = _OS_ERROR.search(str(e))
    if m:
        return int(m.group(1))
    if _TORCH_WRITE_FAILED.search(str(e)) and os.path.lexists(tmp):
        return _probe_errno(tmp)
    return None


def _begin(path: str) -> str:
    """Create the folder and the temporary file of `path`; a folder that cannot be written is a WriteError."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        return _new_temp(path)
    except OSError as e:   # also a full disk: no inode left even for an empty file
        error = _write_error(path, e.errno)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = True, need: Optional[int] = None) -> Iterator[str]:
    """Yield a temporary path beside `path`, fsynced and renamed onto `path` when the block succeeds; on an exception
    it is removed, and a full disk or unwritable folder is a WriteError (need: the bytes it needs, for its line).
    durable=False skips the fsyncs (many small files that can be remade, e.g. sample PNGs)."""
    tmp = _begin(path)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)   # what the umask allows
    try:
        yield tmp
        os.chmod(tmp, mode)   # writers that replace the file they are given (safetensors) leave a 0600 file
        if durable:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        code = _errno_of(e, tmp)   # before the temporary file goes: the probe writes into it
        if os.path.lexists(tmp):
            os.remove(tmp)
        error = _write_error(path, code, need)
        if error is None:
            raise
        raise error from None
    if durable:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def check_writable(folder: str):
    """Create `folder` and a file in it: an unwritable folder is a WriteError now, not at a run's first checkpoint."""
    os.remove(_begin(os.path.join(folder, 'write-check')))


def write_json_atomic(obj: Any, path: str, indent: int = 2):
    """json.dump to `path`, atomically."""
    text = json.dumps(obj, indent=indent)
    with atomic_path(path, need=len(text.encode())) as tmp, open(tmp, 'w') as f:
        f.write(text)


def is_temp_name(name: str) -> bool:
    """True for the temporary files atomic_path makes (left behind only by a killed process)."""
    return name.startswith('.') and name.endswith('.tmp')
