"""The scale loop of a fixed schedule never reads a device value back (no .item(), nonzero, ...); adaptive reads one per iteration."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import schedules as S
from tests.tiny import tiny_vae_var

# ops that copy a device value to the host (a CUDA sync) or whose output shape depends on values
SYNC_OPS = {'_local_scalar_dense', 'item', 'nonzero', 'is_nonzero', 'equal', 'masked_select', 'unique', '_unique2'}


class OpLog(TorchDispatchMode):
    """Records the name of every aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _sync_positions(var, **kw):
    with torch.no_grad(), OpLog() as log:
        _, stats = var.autoregressive_infer_cfg(2, kw.pop('label_B', torch.tensor([0, 3])), return_stats=True, **kw)
    syncs = [i for i, op in enumerate(log.ops) if op in SYNC_OPS]
    last_draw = max(i for i, op in enumerate(log.ops) if op == 'multinomial')
    return syncs, last_draw, stats


@pytest.mark.parametrize('use_implicit', [False, True])
@pytest.mark.parametrize('seeds', [5, [1, 2]])
def test_fixed_schedule_loop_has_no_sync(use_implicit, seeds):
    _, var = tiny_vae_var(use_implicit)
    syncs, last_draw, stats = _sync_positions(var, g_seed=seeds, cfg=1.5, top_k=10, top_p=0.9,
                                              schedule=S.decreasing(3, 1, 4), label_B=None)
    inside = [i for i in syncs if i < last_draw]
    assert inside == [], 'a host read inside the scale loop'
    assert len(syncs) == (len(stats.residuals) if use_implicit else 0)   # residuals read once, after the loop


def test_adaptive_schedule_reads_one_residual_per_iteration():
    _, var = tiny_vae_var(True)
    syncs, last_draw, stats = _sync_positions(var, g_seed=5, cfg=1.5, top_k=10, top_p=0.9,
                                              schedule=S.adaptive(0.05, 3, 4))
    inside = [i for i in syncs if i < last_draw]
    assert len(inside) == sum(stats.iters)
