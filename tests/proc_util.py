"""Child processes for the tests that never outlive them: a timeout kills the whole process group."""
import os
import signal
import subprocess
from typing import List


def run_group(cmd: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a new session; on timeout, SIGKILL every process it started (torchrun workers too)."""
    kw.setdefault('capture_output', True)
    kw.setdefault('text', True)
    capture = kw.pop('capture_output')
    if capture:
        kw.setdefault('stdout', subprocess.PIPE)
        kw.setdefault('stderr', subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:   # workers left behind by a parent that exited (e.g. a crashed launcher)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
