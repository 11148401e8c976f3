"""Memory figures: peak RSS on CPU, CUDA allocator peaks on a GPU, and the activation bytes autograd saves.

Imports nothing from the project, so the benchmark's official-code child can load this file by path.
"""
import ctypes
import os
import resource
from typing import Callable, Dict, Iterable

import torch


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux `clear_refs` 5); False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), else since the process started."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kilobytes on Linux


def current_rss_bytes() -> int:
    """Resident set size now."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def release_freed_memory() -> bool:
    """Make RSS follow live tensors, so a later phase's peak RSS measures what it allocated: glibc serves blocks
    >= 64 KiB by mmap (returned on free) and trims its heap. False without glibc (peaks then stay approximate)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_memory(device: torch.device) -> Dict:
    """This process's peak memory: CUDA max allocated on a GPU, else peak resident set size."""
    if torch.device(device).type == 'cuda':
        return dict(kind='cuda_max_allocated', bytes=int(torch.cuda.max_memory_allocated(device)))
    return dict(kind='cpu_peak_rss', bytes=peak_rss_bytes())


def saved_activation_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for backward during `forward()` (storages counted once, `params` excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())
