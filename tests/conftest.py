"""Shared pytest setup: the repo root on sys.path, the compiler check, and the one quick demo run the slow tests share."""
import os
import subprocess
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


QUICK_DEMO_PROGRESS_S = '1'   # the quick demo's stages last seconds: a progress line every second shows in each


@pytest.fixture(scope='session')
def quick_demo(tmp_path_factory):
    """The output folder of one DEMO_QUICK=1 run of scripts/demo.sh (a few steps of every stage), made once per
    session for every test that reads it (the README walk-through, the demo's own checks). What the run printed
    is in the file `console.txt` beside the folder (`quick_demo_console`)."""
    out = tmp_path_factory.mktemp('quick') / 'demo'
    env = dict(os.environ, DEMO_QUICK='1', DEMO_OUT=str(out), DEMO_PROGRESS_S=QUICK_DEMO_PROGRESS_S)
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh')], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    (out.parent / 'console.txt').write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope='session')
def quick_demo_console(quick_demo) -> str:
    """Everything the quick demo printed (stdout, then stderr)."""
    return (quick_demo.parent / 'console.txt').read_text()
