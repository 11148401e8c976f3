"""Exponential moving average of a model's weights (optional; --ema DECAY)."""
from typing import Dict

import torch
import torch.nn as nn

import dist


def ema_decay_at(decay: float, num_updates: int) -> float:
    """Decay warmed up as min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the init."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


class ModelEMA:
    """Float32 shadow copy of a model's state dict: parameters are averaged, buffers copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.param_names = {n for n, _ in model.named_parameters()}
        self.shadow: Dict[str, torch.Tensor] = {k: (v.float() if v.is_floating_point() else v).detach().clone()
                                                for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module):
        """Fold the model's current weights into the average (call after each optimizer step)."""
        d = ema_decay_at(self.decay, self.num_updates)
        for k, v in model.state_dict().items():
            if k in self.param_names:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:   # buffers (e.g. the -inf attention mask) are copied, never averaged
                self.shadow[k].copy_(v)
        self.num_updates += 1

    def state_dict(self) -> Dict:
        """Shadow weights and the update counter."""
        return {'decay': self.decay, 'num_updates': self.num_updates, 'shadow': self.shadow}

    def load_state_dict(self, sd: Dict):
        """Restore from state_dict(); the decay of the current run is kept. Under FSDP the shadow tensors are
        shards and each takes its part of the whole tensors saved by a DDP run."""
        self.num_updates = sd['num_updates']
        for k, v in sd['shadow'].items():
            dist.copy_full_into(self.shadow[k], v)

    def model_state_dict(self, like: nn.Module) -> Dict[str, torch.Tensor]:
        """The averaged weights in the model's own dtypes, loadable with like.load_state_dict."""
        own = like.state_dict()
        return {k: v.to(own[k].dtype) for k, v in self.shadow.items()}
