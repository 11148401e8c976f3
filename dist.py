"""The one module that touches torch.distributed.

`initialize()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process
group: nccl when the run is on CUDA, gloo on CPU. Without those variables the process runs alone and
every collective below is a no-op (or the identity), so single-process code needs no branches.
"""
import datetime
import os
from typing import Any, List

import torch
import torch.distributed as tdist

_rank, _local_rank, _world_size = 0, 0, 1
_device = torch.device('cpu')
_initialized = False


def initialize(device: str = 'auto', timeout_min: int = 30) -> torch.device:
    """Join the torchrun process group if there is one; returns this process's device.

    device: 'auto' (cuda:<local rank> when CUDA is available, else cpu), 'cpu' or 'cuda'.
    """
    global _rank, _local_rank, _world_size, _device, _initialized
    use_cuda = torch.cuda.is_available() if device in ('', 'auto') else device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit(f'--device {device}: CUDA is not available on this machine; use --device cpu.')
    _local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if use_cuda:
        torch.cuda.set_device(_local_rank % torch.cuda.device_count())
        _device = torch.device('cuda', torch.cuda.current_device())
    else:
        _device = torch.device('cpu')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not _initialized:
        backend = 'nccl' if use_cuda else 'gloo'
        timeout = datetime.timedelta(minutes=timeout_min)
        kw = dict(device_id=_device) if use_cuda else {}
        store = _attempt_store(timeout)
        if store is not None:
            kw.update(store=store, rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
        tdist.init_process_group(backend=backend, timeout=timeout, **kw)
        _rank, _world_size = tdist.get_rank(), tdist.get_world_size()
        _initialized = True
    return _device


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun, the rendezvous store with a prefix per restart attempt (None otherwise).

    After `torchrun --max-restarts` restarts a killed group, the agent's store still holds the previous
    attempt's keys, and the new process group hangs on them (seen with torch 2.11 + gloo); a fresh key
    prefix per attempt avoids that.
    """
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None or 'MASTER_ADDR' not in os.environ:
        return None
    agent_hosts = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == str(True)
    store = tdist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), int(os.environ['WORLD_SIZE']),
                           is_master=not agent_hosts and int(os.environ['RANK']) == 0, timeout=timeout)
    return tdist.PrefixStore(f'viar/attempt_{attempt}', store)


def initialized() -> bool:
    """True when a multi-process group is running."""
    return _initialized


def get_rank() -> int:
    """Global rank (0 in a single process)."""
    return _rank


def get_local_rank() -> int:
    """Rank on this node (selects the GPU)."""
    return _local_rank


def get_world_size() -> int:
    """Number of processes (1 in a single process)."""
    return _world_size


def get_device() -> torch.device:
    """The device this process trains on."""
    return _device


def is_master() -> bool:
    """Global rank 0: the one process that logs and writes shared files."""
    return _rank == 0


def is_local_master() -> bool:
    """Rank 0 of this node."""
    return _local_rank == 0


def barrier():
    """Wait for every rank."""
    if _initialized:
        tdist.barrier()


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns t."""
    if _initialized:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def allreduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns t."""
    if _initialized:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(_world_size)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place copy of rank src's tensor to every rank; returns t."""
    if _initialized:
        tdist.broadcast(t, src=src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's picklable object, on every rank."""
    if not _initialized:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable object, in rank order."""
    if not _initialized:
        return [obj]
    out: List[Any] = [None] * _world_size
    tdist.all_gather_object(out, obj)
    return out


def finalize():
    """Leave the process group (safe to call when none was started)."""
    global _initialized
    if _initialized:
        tdist.destroy_process_group()
        _initialized = False
