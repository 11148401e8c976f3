"""Test doubles for writes that fail: a full disk and a folder that cannot be written.

The double replaces how utils.atomic makes its temporary file, for the files whose name matches a pattern: on a
"full disk" the temporary file is a link to /dev/full, so the real writer (torch.save, np.save, Pillow) meets the
kernel's ENOSPC; on a "read-only folder" making it fails with EROFS. No mount and no root needed.

    python -m tests.write_doubles full 'vae-ckpt-last.pth' train_tokenizer.py --data_path ...

runs an entry point as a user runs it, with the double in place.
"""
import errno
import fnmatch
import os
import runpy
import sys
from typing import Callable

import utils.atomic as atomic

HAS_DEV_FULL = os.path.exists('/dev/full')


def full_disk(pattern: str, real: Callable[[str], str]) -> Callable[[str], str]:
    """A stand-in for utils.atomic._new_temp whose temporary files for names matching `pattern` write to /dev/full."""
    def new_temp(path: str) -> str:
        tmp = real(path)
        if fnmatch.fnmatch(os.path.basename(path), pattern):
            os.remove(tmp)
            os.symlink('/dev/full', tmp)
        return tmp
    return new_temp


def read_only(pattern: str, real: Callable[[str], str]) -> Callable[[str], str]:
    """A stand-in for utils.atomic._new_temp that cannot create files matching `pattern` (a read-only folder)."""
    def new_temp(path: str) -> str:
        if fnmatch.fnmatch(os.path.basename(path), pattern):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path + '.tmp')
        return real(path)
    return new_temp


DOUBLES = {'full': full_disk, 'read_only': read_only}


if __name__ == '__main__':
    kind, pattern, script, *args = sys.argv[1:]
    atomic._new_temp = DOUBLES[kind](pattern, atomic._new_temp)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name='__main__')
