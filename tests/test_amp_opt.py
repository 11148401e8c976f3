"""utils/train/amp_opt.py: a step with non-finite gradients is skipped."""
import torch

from utils.train.amp_opt import AmpOptimizer, build_adamw
from utils.train.lr_control import param_groups


def test_non_finite_gradients_skip_the_step():
    lin = torch.nn.Linear(3, 1)
    _, params, groups = param_groups(lin)
    opt = AmpOptimizer(build_adamw(groups, 0.1, torch.device('cpu')), params, 'fp32', grad_clip=1.0)
    before = [p.detach().clone() for p in lin.parameters()]
    opt.backward((lin(torch.ones(1, 3)) * float('inf')).sum())
    res = opt.step()
    assert not res.stepped and all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    opt.backward(lin(torch.ones(1, 3)).sum())
    res = opt.step()
    assert res.stepped and res.grad_norm > 0 and not torch.equal(before[0], lin.weight)
