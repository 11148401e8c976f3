"""Shared pytest setup: the repo root on sys.path, the compiler check, the test processes (one per core, threads
split between them), and the one quick demo run the slow tests share."""
import fcntl
import os
import subprocess
import sys

import pytest
import torch

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


MAX_WORKERS = 4   # `-n auto` (pytest.ini): a test process per core, at most this many (each holds torch and models)


def pytest_xdist_auto_num_workers(config) -> int:
    """How many processes `-n auto` starts: one per core, capped at MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config):
    """In each of N xdist test processes: torch threads, and OMP_NUM_THREADS for the programs tests start unless
    set, to cores / N, so that processes running side by side do not oversubscribe the cores."""
    workers = getattr(config, 'workerinput', {}).get('workercount', 1)
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault('OMP_NUM_THREADS', str(threads))


QUICK_DEMO_PROGRESS_S = '1'   # the quick demo's stages last seconds: a progress line every second shows in each
QUICK_DEMO_TIMEOUT_S = 300


@pytest.fixture(scope='session')
def quick_demo(tmp_path_factory, pytestconfig):
    """The output folder of one DEMO_QUICK=1 run of scripts/demo.sh (a few steps of every stage), made once per
    run for every test that reads it (the README walk-through, the demo's own checks), in whichever test process
    asks first: the others wait on a lock in the run's folder, which they share. What the run printed is in the
    file `console.txt` beside the folder (`quick_demo_console`). Readers write only folders of their own inside."""
    run_dir = tmp_path_factory.getbasetemp()
    if hasattr(pytestconfig, 'workerinput'):   # an xdist worker: pytest-N/popen-gwK, and pytest-N is this run's
        run_dir = run_dir.parent
    out, rc = run_dir / 'quick' / 'demo', run_dir / 'quick' / 'returncode'
    with open(run_dir / 'quick.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        if not rc.exists():
            out.parent.mkdir(exist_ok=True)
            env = dict(os.environ, DEMO_QUICK='1', DEMO_OUT=str(out), DEMO_PROGRESS_S=QUICK_DEMO_PROGRESS_S)
            try:
                proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh')], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=QUICK_DEMO_TIMEOUT_S)
                console, code = proc.stdout + proc.stderr, str(proc.returncode)
            except subprocess.TimeoutExpired as e:   # recorded like a failure, so no other process runs it again
                console = ''.join(b.decode(errors='replace') if isinstance(b, bytes) else b
                                  for b in (e.stdout, e.stderr) if b)
                console, code = console + f'\nover {QUICK_DEMO_TIMEOUT_S} s: stopped', 'timeout'
            (out.parent / 'console.txt').write_text(console)
            rc.write_text(code)
    assert rc.read_text() == '0', (out.parent / 'console.txt').read_text()[-6000:]
    return out


@pytest.fixture(scope='session')
def quick_demo_console(quick_demo) -> str:
    """Everything the quick demo printed (stdout, then stderr)."""
    return (quick_demo.parent / 'console.txt').read_text()
