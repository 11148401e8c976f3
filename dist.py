"""The one module that touches torch.distributed.

`initialize()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process
group: nccl when the run is on CUDA, gloo on CPU. Without those variables the process runs alone and
every collective below is a no-op (or the identity), so single-process code needs no branches.

Environment:
  VIAR_DIST_TIMEOUT_S  seconds a collective (and the process-group set-up) waits for the other ranks
                       before failing; default 1800 (30 min). A peer whose process died usually fails
                       the collective at once (its sockets close); a hung peer, or a lost node whose
                       connections stay open, only after this timeout. Tests set a few seconds; it must
                       exceed the longest legitimate wait (rank 0 writing a checkpoint while the others
                       wait at the barrier).
"""
import datetime
import os
import warnings
from typing import Any, List, Optional

import torch
import torch.distributed as tdist

_rank, _local_rank, _world_size = 0, 0, 1
_device = torch.device('cpu')
_initialized = False


DEFAULT_TIMEOUT_S = 30 * 60


def timeout_from_env() -> datetime.timedelta:
    """The collective timeout: $VIAR_DIST_TIMEOUT_S seconds, else 30 minutes."""
    raw = os.environ.get('VIAR_DIST_TIMEOUT_S', '').strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        sec = float(raw)
    except ValueError:
        sec = -1.0
    if not sec > 0:
        raise SystemExit(f'VIAR_DIST_TIMEOUT_S={raw!r}: expected a positive number of seconds.')
    return datetime.timedelta(seconds=sec)


def initialize(device: str = 'auto', timeout_s: Optional[float] = None) -> torch.device:
    """Join the torchrun process group if there is one; returns this process's device.

    device: 'auto' (cuda:<local rank> when CUDA is available, else cpu), 'cpu' or 'cuda'.
    timeout_s: collective timeout; None reads $VIAR_DIST_TIMEOUT_S (default 30 minutes).
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
        timeout = timeout_from_env() if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        kw = dict(device_id=_device) if use_cuda else {}
        store = _attempt_store(timeout)
        if store is not None:
            kw.update(store=store, rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
        tdist.init_process_group(backend=backend, timeout=timeout, **kw)
        _rank, _world_size = tdist.get_rank(), tdist.get_world_size()
        _initialized = True
    return _device


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun with the agent's shared store, that store with a prefix per restart attempt.

    After `torchrun --max-restarts` restarts a killed group, the agent's store still holds the previous
    attempt's keys, and the new process group hangs on them (seen with torch 2.11 + gloo); a fresh key
    prefix per attempt avoids that. The attempt number is counted by each node's agent, so it is the
    same on every rank only on one node (pytorch#135712): across nodes, a rank can read another attempt's
    gloo addresses and fail, costing one more restart, or wait. Multi-node elastic runs therefore turn the
    shared store off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as scripts/train.sh does): rank 0 then
    hosts a new store on a new port each rendezvous round, which needs no prefix (None is returned and
    init_process_group reads MASTER_ADDR/MASTER_PORT itself).
    """
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None or 'MASTER_ADDR' not in os.environ:
        return None
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != str(True):
        return None
    nodes, restarts = int(os.environ.get('GROUP_WORLD_SIZE', 1)), int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0))
    if nodes > 1 and restarts > 0 and os.environ.get('LOCAL_RANK', '0') == '0':
        warnings.warn(f'{nodes} nodes with torchrun --max-restarts={restarts} and the shared agent store: a restart '
                      f'can fail or hang, as each node counts its own restarts (pytorch#135712). Set '
                      f'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, as scripts/train.sh does.')
    store = tdist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), int(os.environ['WORLD_SIZE']),
                           is_master=False, timeout=timeout)
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


def get_local_world_size() -> int:
    """Number of processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 in a single process)."""
    return int(os.environ.get('LOCAL_WORLD_SIZE', 1)) if _initialized else 1


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
