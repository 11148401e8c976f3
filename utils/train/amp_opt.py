"""Optimizer wrapper: mixed precision (fp16 with a GradScaler, or bf16), grad accumulation, clipping, skipped steps.

`backward(loss)` accumulates 1/ac of the loss's gradient; `step()` unscales, clips, and steps unless the
gradient norm is non-finite (then the step is skipped and the grads dropped).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import dist

PRECISIONS = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}


@dataclass
class StepResult:
    """What one backward/step call did."""
    stepped: bool                 # the optimizer took a step
    grad_norm: Optional[float]    # pre-clip global grad norm (None when not stepping)
    scale_log2: Optional[float]   # fp16 loss scale, log2 (None without a scaler)


def build_adamw(param_groups: List[Dict], lr: float, device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the official betas (0.9, 0.95), fused kernels when asked for and supported."""
    groups = [{k: v for k, v in g.items() if k != 'names'} for g in param_groups]
    kw = dict(lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    if fused and torch.device(device).type in ('cuda', 'cpu'):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kw)


class AmpOptimizer:
    """Autocast context, (scaled) backward, accumulation, clipping and a step that skips non-finite gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter], precision: str = 'fp32',
                 grad_clip: float = 2.0, accum_steps: int = 1, device_type: str = 'cuda'):
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {precision!r}')
        self.optimizer, self.params = optimizer, params
        self.precision, self.grad_clip, self.accum_steps = precision, grad_clip, accum_steps
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 11, growth_interval=1000) \
            if precision == 'fp16' else None

    def amp_ctx(self):
        """The autocast context of the forward pass (a no-op for fp32)."""
        if PRECISIONS[self.precision] is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=PRECISIONS[self.precision])

    def backward(self, loss: torch.Tensor):
        """Accumulate the gradient of loss / accum_steps (scaled under fp16)."""
        loss = loss / self.accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> StepResult:
        """Unscale, clip, step and zero the grads; returns whether a step was taken."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float('inf')
        # the global norm; under FSDP a DTensor already reduced over the gradient shards, the same on every rank
        norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
        stepped, scale_log2 = math.isfinite(norm), None
        if self.scaler is not None:
            # the scaler skips the step itself on inf/nan grads and lowers the scale
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            # fp16 overflows above 65504: never let the scale grow past 2**15
            self.scaler.update(new_scale=32768.0 if scale_before > 32768.0 else None)
            scale_log2 = math.log2(max(self.scaler.get_scale(), 1e-30))
        elif stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(stepped, norm, scale_log2)

    def skip(self):
        """Drop the accumulated grads without stepping (a non-finite loss in this accumulation window)."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> Dict:
        """Optimizer (and scaler) state."""
        sd = {'optimizer': self.optimizer.state_dict()}
        if self.scaler is not None:
            sd['scaler'] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, sd: Dict):
        """Restore optimizer (and scaler, when both sides use one) state."""
        self.optimizer.load_state_dict(sd['optimizer'])
        if self.scaler is not None and 'scaler' in sd:
            self.scaler.load_state_dict(sd['scaler'])
