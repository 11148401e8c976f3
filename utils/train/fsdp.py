"""`train.py --fsdp`: the precision of sharding the transformer with FSDP2, and the bytes it leaves on each rank.

What is wrapped, and why fp16 is refused: docs/TRAINING.md, "FSDP". Memory arithmetic (pure): FSDP2 shards every
parameter on its first dimension in chunks of ceil(dim0 / world) rows (torch.chunk), so a rank holds at most
that many rows of each parameter, and as many of its fp32 gradient and AdamW moments.
"""
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch

ADAMW_MOMENTS = 2          # exp_avg, exp_avg_sq, each like the parameter
STATE_BYTES = 4            # fp32 sharded parameters, gradients and moments (bf16 only for the gathered copies)


def fsdp_dtypes(precision: str) -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(param dtype of the gathered units, gradient-reduction dtype) for a run's precision; fp16 is refused."""
    if precision == 'fp16':
        raise SystemExit('--fsdp with --fp16 1: fp16 needs a loss scaler that agrees on overflow across gradient '
                         'shards, which this trainer does not have; train in bf16 instead: --fp16=2 (bf16 compute, '
                         'fp32 gradient reduction, no scaler; scripts/train.sh sets --fp16=1, so add --fp16=2 after '
                         'it, e.g. bash scripts/train.sh --fsdp --fp16=2).')
    if precision == 'bf16':
        return torch.bfloat16, torch.float32
    return None, None


def shard_numel(shape: Sequence[int], world: int) -> int:
    """Elements of a parameter of this shape on the fullest rank: ceil(dim0 / world) rows (a 0-d one is not split)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


@dataclass(frozen=True)
class RankBytes:
    """Persistent training state on the fullest rank (fp32 parameters, gradients, AdamW state)."""
    params: int
    grads: int
    optim: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim

    @classmethod
    def of(cls, elements: int, tensors: int) -> 'RankBytes':
        """For `elements` parameter elements in `tensors` parameters (AdamW's 4-byte step counter per parameter
        counted with the optimizer state)."""
        return cls(params=elements * STATE_BYTES, grads=elements * STATE_BYTES,
                   optim=elements * STATE_BYTES * ADAMW_MOMENTS + tensors * STATE_BYTES)


def rank_bytes(shapes: Iterable[Sequence[int]], world: int) -> RankBytes:
    """Bytes of parameters + gradients + AdamW state one rank holds, for trainable parameters of these shapes."""
    shapes = list(shapes)
    return RankBytes.of(sum(shard_numel(s, world) for s in shapes), len(shapes))


def measured_rank_bytes(params: Iterable[torch.nn.Parameter], local_numel) -> RankBytes:
    """The same quantity read off real (or meta) parameters: local_numel(p) is the elements this rank holds."""
    params = [p for p in params if p.requires_grad]
    return RankBytes.of(sum(local_numel(p) for p in params), len(params))
