"""Shared pytest setup: the repo root on sys.path, single-threaded torch for stable CPU timings."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _has_c_compiler() -> bool:
    """Inductor generates C++ on CPU: it needs a compiler (torch looks for $CXX, then c++/g++/clang++)."""
    import shutil
    return any(shutil.which(c) for c in (os.environ.get('CXX', ''), 'c++', 'g++', 'clang++') if c)


# a compile test fails when compiling fails; it is skipped only where no C compiler exists, and says so
needs_c_compiler = pytest.mark.skipif(not _has_c_compiler(),
                                      reason='no C++ compiler on this machine: inductor cannot generate code here')
