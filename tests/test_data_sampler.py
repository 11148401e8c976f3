"""utils/data/sampler.py: global batches independent of the world size, resume at a position, the eval split."""
from utils.data.sampler import DistInfiniteBatchSampler, EvalDistributedSampler, epoch_permutation


def _epoch_batches(world, glb, n=13, seed=3, epochs=2):
    out = []
    for r in range(world):
        s = DistInfiniteBatchSampler(n, glb, rank=r, world_size=world, seed=seed)
        it = iter(s)
        out.append([next(it) for _ in range(epochs * len(s))])
    # global batch k = concatenation of the ranks' k-th local batches
    return [sum((out[r][k] for r in range(world)), []) for k in range(len(out[0]))]


def test_global_batches_do_not_depend_on_world_size_and_cover_the_epoch():
    one, two = _epoch_batches(1, 4), _epoch_batches(2, 4)
    assert one == two
    first_epoch = [idx for batch in one[:4] for idx, _ in batch]
    assert set(first_epoch) == set(range(13)) and len(first_epoch) == 16   # last batch filled from the start
    assert [i for b in one[:4] for i, _ in b] != [i for b in one[4:] for i, _ in b]   # reshuffled per epoch
    seeds = [s for b in one for _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_sampler_resumes_at_its_saved_position():
    s = DistInfiniteBatchSampler(11, 4, seed=5)      # 3 global batches per epoch, the last topped up by 1
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.position_at(5)   # the next batch
    tail = [next(it) for _ in range(6)]
    run = head + tail
    for e in range(3):   # epoch e: its permutation in batches of 4, the last one padded with the permutation's start
        perm = epoch_permutation(5, e, 11)
        assert sorted(perm) == list(range(11))
        assert [[i for i, _ in b] for b in run[3 * e:3 * e + 3]] == [perm[0:4], perm[4:8], perm[8:11] + perm[:1]], e
    t = DistInfiniteBatchSampler(11, 4, seed=5)
    t.load_state_dict(state)
    ti = iter(t)
    assert [next(ti) for _ in range(6)] == tail
    for r in range(len(run)):   # same batches, augmentation seeds included, whatever the restart point
        u = DistInfiniteBatchSampler(11, 4, seed=5)
        u.load_state_dict(u.position_at(r))
        ui = iter(u)
        assert [next(ui) for _ in range(len(run) - r)] == run[r:], f'restart at batch {r}'


def test_eval_sampler_splits_without_overlap():
    parts = [EvalDistributedSampler(10, r, 3).indices for r in range(3)]
    assert sum(parts, []) == list(range(10))
