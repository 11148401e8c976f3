"""The one module that touches torch.distributed.

`initialize()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process
group: nccl when the run is on CUDA, gloo on CPU. Without those variables the process runs alone and
every collective below is a no-op (or the identity), so single-process code needs no branches.
$VIAR_DIST_TIMEOUT_S (default 1800) is how long a collective waits for the other ranks (docs/TRAINING.md, "Timeouts").
"""
import contextlib
import datetime
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_rank, _local_rank, _world_size = 0, 0, 1
_device = torch.device('cpu')
_initialized = False


DEFAULT_TIMEOUT_S = 30 * 60


def timeout_from_env() -> datetime.timedelta:
    """The collective timeout: $VIAR_DIST_TIMEOUT_S seconds, else 30 minutes."""
    raw = os.environ.get('VIAR_DIST_TIMEOUT_S', '').strip() or str(DEFAULT_TIMEOUT_S)
    try:
        sec = float(raw)
    except ValueError:
        sec = -1.0
    if not sec > 0:
        raise SystemExit(f'VIAR_DIST_TIMEOUT_S={raw!r}: expected a positive number of seconds.')
    return datetime.timedelta(seconds=sec)


def initialize(device: str = 'auto') -> torch.device:
    """Join the torchrun process group if there is one; returns this process's device ('auto': cuda:<local rank>
    when CUDA is available, else cpu)."""
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
        timeout = timeout_from_env()
        kw = dict(device_id=_device) if use_cuda else {}
        store = _attempt_store(timeout)
        if store is not None:
            kw.update(store=store, rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
        tdist.init_process_group(backend=backend, timeout=timeout, **kw)
        _rank, _world_size = tdist.get_rank(), tdist.get_world_size()
        _initialized = True
    return _device


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun with the agent's shared store, that store with a prefix per restart attempt: a restarted
    group would otherwise hang on the previous attempt's keys. None (init_process_group reads MASTER_ADDR itself)
    otherwise; why several nodes turn the shared store off: docs/TRAINING.md, "Rules for several nodes"."""
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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable object, on every rank."""
    if not _initialized:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
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


def allreduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; returns t."""
    if _initialized:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


# ---------------------------------------------------------------- FSDP2: sharded parameters, gradients, optimizer state
# torch.distributed.checkpoint takes 0.3 s to import and only --fsdp runs use it: the functions below import it.

def fsdp_shard(model: torch.nn.Module, units: List[List[torch.nn.Module]], param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = None):
    """Shard `model` in place with FSDP2: every unit (modules gathered together) computing in param_dtype and
    reducing gradients in reduce_dtype, then the root, whose params (embeddings, head) keep their dtype. Create the
    optimizer and EMA after this: they hold the shards."""
    if not _initialized:
        raise RuntimeError('fsdp_shard needs a process group of several ranks')
    mesh = init_device_mesh(_device.type, (_world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in units:
        fully_shard(unit[0] if len(unit) == 1 else list(unit), mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))


def is_sharded(t: Any) -> bool:
    """A DTensor (an FSDP2 parameter, gradient or optimizer state), as opposed to an ordinary tensor."""
    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; an ordinary tensor itself."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); an ordinary tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def gather_full(sd: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """On rank 0, a state dict with every DTensor gathered whole, on the CPU; None on the other ranks, which take
    part in each gather (a collective: every rank calls it, in order) but keep nothing."""
    out = {}
    for k, v in sd.items():
        whole = full_tensor(v).detach()
        if is_master():
            out[k] = whole.cpu()
    return out if is_master() else None


def copy_full_into(dst: torch.Tensor, full: torch.Tensor):
    """dst <- full, where dst may be a DTensor: each rank copies its own shard of `full` (no communication)."""
    if is_sharded(dst):
        part = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(part.to_local())
    else:
        dst.copy_(full)


def model_optim_state(model: torch.nn.Module, optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model state, optimizer state) keyed by parameter names, sharded as the model is (DTensors under FSDP2,
    ordinary tensors otherwise): what a sharded checkpoint saves, and the empty shapes it loads into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(model, optimizer)


def set_model_optim_state(model: torch.nn.Module, optimizer, model_sd: Dict[str, Any], optim_sd: Dict[str, Any],
                          full: bool = False):
    """Load states keyed by parameter names; full=True: whole (unsharded) tensors on every rank, each rank keeping
    its shard (a DDP checkpoint resumed under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=full))


def dcp_save(state: Dict[str, Any], folder: str):
    """Write a dict of (sharded) tensors with torch.distributed.checkpoint: each rank writes its shards
    (__<rank>_0.distcp, fsynced), rank 0 the .metadata; returns when every rank is done."""
    import torch.distributed.checkpoint as dcp
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, sync_files=True), no_dist=not _initialized)


def dcp_load(state: Dict[str, Any], folder: str, metadata: Any):
    """Fill a dict of (sharded) tensors in place from a torch.distributed.checkpoint folder, resharding to this
    world size. `metadata` is the folder's .metadata as utils.checkpoint.read_dcp_metadata read it (restricted
    unpickler): DCP's own reader, which unpickles the file fully, is never called."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, 'storage_meta', None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    dcp.load(state, storage_reader=CheckedReader(folder), no_dist=not _initialized)


@contextlib.contextmanager
def fake_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """Pretend, in this one process, to be rank `rank` of `world_size` (torch's fake process group: collectives
    return at once and move no data). For arithmetic on sharded shapes (bench/train_speed.py --fsdp, on the meta
    device) and for counting FSDP's collectives; never for training."""
    global _rank, _world_size, _initialized
    # imported here: a torch-internal testing module whose import registers the 'fake' backend
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if tdist.is_initialized():
        raise RuntimeError('fake_group needs a process without a process group')
    saved = (_rank, _world_size, _initialized)
    tdist.init_process_group('fake', store=FakeStore(), rank=rank, world_size=world_size)
    _rank, _world_size, _initialized = rank, world_size, True
    try:
        yield
    finally:
        tdist.destroy_process_group()
        _rank, _world_size, _initialized = saved
