"""--workers auto (min(8, cpus // ranks_per_node) loader processes per rank) and the order of samples, which must not
depend on the number of workers or of ranks (utils/data/loader.py, utils/data/sampler.py, utils/data/datasets.py)."""
import pytest
import torch
from torch.utils.data import DataLoader

from utils.data.datasets import build_datasets
from utils.data.loader import auto_workers, loader_kwargs, parse_workers, resolve_workers
from utils.data.sampler import DistInfiniteBatchSampler
from utils.train import args as arg_util
from tests.train_helpers import make_image_folder


@pytest.mark.parametrize('cpus, ranks, want', [(16, 8, 2), (64, 8, 8), (96, 8, 8), (2, 2, 1), (1, 2, 0), (128, 1, 8),
                                               (7, 2, 3)])
def test_auto_rule(cpus, ranks, want):
    assert auto_workers(cpus, ranks) == want


def test_resolve_and_parse():
    assert resolve_workers('auto', 64, 8, 32) == (8, 'auto: min(8, 64 CPUs // 8 rank(s) on this node)')
    n, why = resolve_workers('auto', 64, 1, 4)          # never more workers than samples in a batch
    assert n == 4 and 'at most one per sample' in why
    assert resolve_workers('0', 64, 8, 32) == (0, '--workers')
    assert resolve_workers(3, 64, 8, 32)[0] == 3
    assert parse_workers(' AUTO ') is None
    for bad in ('-1', 'many', '2.5'):
        with pytest.raises(SystemExit, match="'auto'"):
            parse_workers(bad)


def test_derive_defaults_to_auto_and_official_zero_stays():
    a = arg_util.parse_args(['--bs=64'])
    assert a.data.workers == 'auto'
    der = arg_util.derive(a, world_size=8, cpus=16, ranks_per_node=8)
    assert der.workers == 2 and '16 CPUs // 8' in der.workers_rule
    assert arg_util.derive(arg_util.parse_args(['--bs=256']), 16, cpus=128, ranks_per_node=8).workers == 8   # 2 nodes of 8
    assert arg_util.derive(arg_util.parse_args(['--bs=64', '--workers=0']), 8, 16, 8).workers == 0
    with pytest.raises(SystemExit, match='--workers'):
        arg_util.derive(arg_util.parse_args(['--bs=64', '--workers=x']), 8, 16, 8)


def test_loader_settings():
    assert loader_kwargs(0, pin=False) == dict(num_workers=0, pin_memory=False)   # the official in-process loading
    kw = loader_kwargs(3, pin=True)
    assert kw['persistent_workers'] and kw['prefetch_factor'] >= 2 and kw['pin_memory'] and kw['num_workers'] == 3


def _batches(data: str, workers: int, world: int, rank: int, n: int, start_it: int = 0):
    """The first n local batches of a rank, loaded with `workers` processes (random crops and flips on)."""
    _, train_set, _ = build_datasets(data, final_reso=16, mid_reso_px=20, hflip=True)
    sampler = DistInfiniteBatchSampler(len(train_set), 6, rank, world, seed=5)
    sampler.load_state_dict(sampler.position_at(start_it))
    it = iter(DataLoader(train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(99 + rank),
                         **loader_kwargs(workers, pin=False)))
    return [next(it) for _ in range(n)]


@pytest.mark.filterwarnings('ignore:This DataLoader will create')   # 3 workers on a 2-core machine: on purpose
def test_sample_order_and_augmentation_independent_of_workers_and_ranks(tmp_path):
    data = make_image_folder(str(tmp_path / 'd'), classes=3, per_class=5, size=24)   # 15 images: 3 batches of 6 per epoch
    ref = _batches(data, 0, 1, 0, 5)                                                  # crosses an epoch boundary
    for workers in (1, 3):
        got = _batches(data, workers, 1, 0, 5)
        for (img_a, lab_a), (img_b, lab_b) in zip(ref, got):
            assert torch.equal(lab_a, lab_b) and torch.equal(img_a, img_b)
    # two ranks with two workers each: rank slices of each global batch, in rank order
    halves = [_batches(data, 2, 2, r, 5) for r in range(2)]
    for k, (img, lab) in enumerate(ref):
        assert torch.equal(torch.cat([halves[0][k][1], halves[1][k][1]]), lab)
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), img)
    # a loader started at step 3 (a resume) with workers yields what the uninterrupted one did from there
    resumed = _batches(data, 2, 1, 0, 2, start_it=3)
    for (img_a, lab_a), (img_b, lab_b) in zip(ref[3:], resumed):
        assert torch.equal(lab_a, lab_b) and torch.equal(img_a, img_b)
    assert not torch.equal(ref[0][0], ref[3][0])   # the augmentation differs by epoch (the test can fail)
