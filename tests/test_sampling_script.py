"""sampling.py: the global plan, rank-independent images, the .npz layout, resume after a kill, official seeds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from utils.sample_plan import make_plan, png_name, rank_share, sample_folder_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_CASES = [(3, 3, 2), (4, 50, 25), (2, 5, 7), (1, 1, 1), (5, 4, 3)]


# ---------------------------------------------------------------- the plan (pure)

@pytest.mark.parametrize('world', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('num_classes,per_class,batch_size', PLAN_CASES)
def test_plan_covers_every_index_once(world, num_classes, per_class, batch_size):
    plan = make_plan(num_classes, per_class, batch_size, seed=1)
    shares = [rank_share(plan, r, world) for r in range(world)]
    got = [i for share in shares for b in share for i in b.indices]
    assert sorted(got) == list(range(num_classes * per_class))
    assert len(got) == len(set(got))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1          # round-robin: balanced
    for b in plan:
        assert 1 <= b.size <= batch_size
        assert {i // per_class for i in b.indices} == {b.label}         # a batch never mixes classes
    assert [b.order for b in plan] == list(range(len(plan)))


def test_plan_seeds_distinct_and_stable():
    plan = make_plan(4, 6, 2, seed=7)
    assert len({b.seed for b in plan}) == len(plan)
    # a class's batches do not depend on how many classes are sampled
    small = make_plan(2, 6, 2, seed=7)
    assert [(b.label, b.seed, b.start) for b in small] == [(b.label, b.seed, b.start) for b in plan[:len(small)]]
    assert {b.seed for b in make_plan(4, 6, 2, seed=8)}.isdisjoint({b.seed for b in plan})


def test_official_seed_rule():
    plan = make_plan(1000, 50, 25, seed=1, official_seeds=True)
    assert len(plan) == 2000
    assert {b.seed for b in plan} == {1, 2}                               # official: seed + i for every class
    assert all(b.seed == 1 + b.chunk for b in plan)
    assert [(b.label, b.start, b.size) for b in plan[2:4]] == [(1, 50, 25), (1, 75, 25)]


def test_plan_rejects_bad_sizes():
    for bad in [(0, 3, 2, 1), (3, 0, 2, 1), (3, 3, 0, 1), (3, 3, 2, -1)]:
        with pytest.raises(ValueError):
            make_plan(*bad)


def test_official_folder_name():
    assert sample_folder_name(True, 30, 'ckpts/viar.pth', 1.5, 1) == 'implicit-viar.pth-cfg-1.5-seed-1'
    assert sample_folder_name(False, 16, '/x/var_d16.pth', 2, 3) == 'd16-var_d16.pth-cfg-2.0-seed-3'
    assert png_name(123) == '000123.png'
