"""How many loader processes a rank gets, and the DataLoader settings that go with them (docs/TRAINING.md,
"Data loading"): `--workers auto` = min(8, cpus // ranks_per_node), the CPUs of this process's affinity mask
shared by the node's ranks; `--workers 0` loads in the training process, as official.
"""
import os
from typing import Any, Dict, Optional, Tuple

MAX_AUTO_WORKERS = 8
PREFETCH_BATCHES = 4      # per worker: enough to hide a slow JPEG behind the others


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM's --cpus-per-task or a container gives it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def auto_workers(cpus: int, ranks_per_node: int, cap: int = MAX_AUTO_WORKERS) -> int:
    """min(cap, cpus // ranks_per_node): the node's CPUs shared by its ranks (0 when there are more ranks than CPUs)."""
    return min(cap, cpus // max(1, ranks_per_node))


def parse_workers(text) -> Optional[int]:
    """'auto' -> None, '4' -> 4; anything else is a one-line SystemExit."""
    text = str(text).strip().lower()
    if text == 'auto':
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise SystemExit(f"--workers {text!r}: give a number of loader processes per rank (0: load in the training "
                         f"process, as official) or 'auto'.")
    return n


def resolve_workers(text, cpus: int, ranks_per_node: int, batch_size: int) -> Tuple[int, str]:
    """(workers per rank, how the number was reached, for the log) for a --workers value."""
    asked = parse_workers(text)
    if asked is None:
        n = auto_workers(cpus, ranks_per_node)
        why = f'auto: min({MAX_AUTO_WORKERS}, {cpus} CPUs // {ranks_per_node} rank(s) on this node)'
    else:
        n, why = asked, '--workers'
    if n > batch_size:
        n, why = batch_size, why + f', at most one per sample of the {batch_size}-sample batch'
    return n, why


def loader_kwargs(workers: int, pin: bool) -> Dict[str, Any]:
    """DataLoader keyword arguments for `workers` processes: persistent, prefetching; pinned memory for CUDA."""
    kw: Dict[str, Any] = dict(num_workers=workers, pin_memory=pin)
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return kw
