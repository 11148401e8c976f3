"""Stochastic Jacobian-free backprop (S-JFB): how many implicit iterations run with and without grad."""
import random
from typing import Tuple


def draw_jfb_iters(rng: random.Random, no_grad: Tuple[int, int] = (0, 10),
                   with_grad: Tuple[int, int] = (1, 12)) -> Tuple[int, int]:
    """n ~ U{no_grad}, m ~ U{with_grad} (inclusive bounds). Pass a rank-identical rng under DDP."""
    n = rng.randint(no_grad[0], no_grad[1])
    m = rng.randint(with_grad[0], with_grad[1])
    return n, m


def step_rng(seed: int, step: int) -> random.Random:
    """A generator that every rank builds identically for a given (seed, global step)."""
    return random.Random(f'sjfb-{seed}-{step}')
