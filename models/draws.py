"""Training randomness of one step drawn for the whole global batch: class dropout and drop path.

Shapes: G rows of the global batch (all ranks), B this rank's rows, K block calls of one training forward
(VIAR: pre-blocks, then n + m implicit iterations, then post-blocks).

Every draw of step `step` is made for all G rows from a generator keyed by (seed, step, stream), and each rank
keeps its rows [offset, offset + B), so the masks do not depend on the world size (the official per-rank streams:
docs/TRAINING.md). Stream 0 is class dropout, stream 1 + k block call k. The masks are tensors handed to the
model, so activation checkpointing recomputes with the same ones and `torch.compile` sees no generator.
"""
from typing import List, NamedTuple, Sequence, Tuple

import torch

_MIX = 0x9E3779B97F4A7C15


class BatchDraws(NamedTuple):
    """One step's draws for this rank's rows (VARBase.forward takes them as `draws`)."""
    cond_drop_B: torch.Tensor      # (B,) bool: the class is replaced by the null class
    path_keep_K2B: torch.Tensor    # (K, 2, B) float: drop-path scale (0 or 1/keep) of call k's attention, MLP branch


def global_uniform(seed: int, step: int, stream: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """U[0, 1) draws of one stream for the whole global batch (last dim = G), on the CPU, identical on every rank."""
    # a generator seed distinct for distinct (seed, step, stream)
    g = torch.Generator().manual_seed((seed * _MIX + step * 1_000_003 + stream * 7_919) % (2 ** 63))
    return torch.rand(shape, generator=g)


def keep_scale(u: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Drop-path scale from uniforms: 1 / keep where u < keep (the branch is kept), else 0; ones when drop_prob == 0."""
    if drop_prob <= 0:
        return torch.ones_like(u)
    keep = 1 - drop_prob
    return (u < keep).float().div_(keep)


def step_draws(seed: int, step: int, offset: int, rows: int, global_rows: int, cond_drop_rate: float,
               drop_probs: Sequence[float], device=None) -> BatchDraws:
    """This rank's class-dropout and drop-path draws of step `step` (drop_probs: one rate per block call)."""
    if offset < 0 or offset + rows > global_rows:
        raise ValueError(f'rows [{offset}, {offset + rows}) lie outside a global batch of {global_rows}')
    mine = slice(offset, offset + rows)
    cond_drop_B = global_uniform(seed, step, 0, (global_rows,))[mine] < cond_drop_rate
    keeps: List[torch.Tensor] = [keep_scale(global_uniform(seed, step, 1 + k, (2, global_rows))[:, mine], p)
                                 for k, p in enumerate(drop_probs)]
    path_keep_K2B = torch.stack(keeps) if keeps else torch.ones(0, 2, rows)
    return BatchDraws(cond_drop_B.to(device), path_keep_K2B.to(device))
