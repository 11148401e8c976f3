"""Child processes for the tests that never outlive them: a timeout kills the process and everything it started.

A process group is not enough: torchrun starts each worker in its own session, so killing the launcher's group
leaves the workers running. `kill_tree` follows parent links (/proc) instead.
"""
import os
import signal
import subprocess
from typing import Dict, List


def descendants(pid: int) -> List[int]:
    """pid's child processes, recursively (from /proc, so also those in other sessions)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int):
    """SIGKILL pid, its descendants and their process groups (a torchrun launcher and its workers, as a node loss).

    pid is stopped first, so that it starts no new child (a torchrun agent restarting a worker) while they are
    collected. A child that a dead parent left behind is no longer pid's descendant: kill the tree while pid lives.
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    for p in [pid] + descendants(pid):
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


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
            kill_tree(proc.pid)   # workers in their own sessions too, while the launcher still links to them
            proc.communicate()
            raise
        finally:
            try:   # whatever is left in the group of a parent that exited (e.g. a crashed launcher)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
