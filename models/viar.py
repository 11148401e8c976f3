"""VIAR: VAR whose deep middle stack is one weight-shared implicit block iterated to a fixed point.

Shapes: B batch, L tokens, l tokens of one scale, C width.
Each iteration is z <- f(Proj([z, x]), c): x is the pre-blocks' output (input injection),
z0 = x, Proj = Linear(2C, 2C) -> GELU(tanh) -> Linear(2C, C). Training uses S-JFB: n iterations
without grad, then m with grad, so memory does not grow with the effective depth.
"""
import dataclasses
import random
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from models.blocks import AdaLNSelfAttn
from models.jfb import draw_jfb_iters, step_rng
from models.kv_cache import IterKVCaches, KVCache
from models.schedules import IterSchedule
from models.solver import SolverSpec
from models.var import VARBase


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


class VIAR(VARBase):
    """pre_depth explicit blocks, one implicit block, post_depth explicit blocks."""

    use_implicit = True
    kind = 'VIAR'

    def __init__(self, vae_local, pre_depth: int = 5, post_depth: int = 5,
                 jfb_no_grad: Tuple[int, int] = (0, 10), jfb_with_grad: Tuple[int, int] = (1, 12), **kw):
        self.pre_depth, self.post_depth = pre_depth, post_depth
        self.jfb_no_grad, self.jfb_with_grad = tuple(jfb_no_grad), tuple(jfb_with_grad)
        if jfb_with_grad[0] < 1:
            raise ValueError('S-JFB needs at least one iteration with grad (jfb_with_grad[0] >= 1)')
        super().__init__(vae_local, **kw)

    def build_backbone(self):
        C, depth = self.C, self.depth
        if self.pre_depth + self.post_depth >= depth:
            raise ValueError(f'pre_depth + post_depth ({self.pre_depth}+{self.post_depth}) must be < depth ({depth})')
        self.implicit_block_projection = nn.Sequential(nn.Linear(2 * C, 2 * C), nn.GELU(approximate='tanh'),
                                                       nn.Linear(2 * C, C))
        self.pre_blocks = nn.ModuleList([self._make_block(i, self.dpr[i]) for i in range(self.pre_depth)])
        # the implicit block is built like block depth // 2 of the explicit stack
        self.implicit_block = self._make_block(depth // 2, self.dpr[depth // 2])
        self.post_blocks = nn.ModuleList([self._make_block(i, self.dpr[i]) for i in range(depth - self.post_depth, depth)])

    def backbone_blocks(self) -> List[AdaLNSelfAttn]:
        return [*self.pre_blocks, self.implicit_block, *self.post_blocks]

    # ---- answers to the questions VARBase asks
    def sjfb_plan(self, step: Optional[int] = None, seed: int = 0) -> Tuple[int, int]:
        """(n, m) of a training step: identical on every rank for a given (seed, step); step=None draws from
        Python's global `random`, which is seeded per rank (the official code's draw)."""
        return draw_jfb_iters(random if step is None else step_rng(seed, step), self.jfb_no_grad, self.jfb_with_grad)

    def eval_sjfb(self) -> Tuple[int, int]:
        """The rounded means of the S-JFB ranges."""
        (n0, n1), (m0, m1) = self.jfb_no_grad, self.jfb_with_grad
        return round((n0 + n1) / 2), round((m0 + m1) / 2)

    def scale_loop_modules(self) -> List[nn.Module]:
        return [*super().scale_loop_modules(), self.implicit_block_projection]

    def run_name_head(self) -> str:
        return 'implicit'

    def _blocks_text(self) -> str:
        return f' ({self.pre_depth} pre + implicit + {self.post_depth} post)'

    def schedule_note(self, schedule: IterSchedule) -> str:
        return f'schedule {schedule.describe()}'

    def schedule_settings(self, schedule: IterSchedule, fill_forward: bool, solver: Optional[SolverSpec] = None) -> dict:
        out = dict(counts=list(schedule.counts), tau=schedule.tau, stop_mode=schedule.stop_mode,
                   min_iters=schedule.min_iters, fill_forward=fill_forward)
        if solver is not None and solver != SolverSpec():   # the default keeps folders of earlier runs resumable
            out['solver'] = dataclasses.asdict(solver)
        return out

    def register_iterate_hook(self, fn):
        """fn(z_t, z_next) after every implicit iteration; returns a handle whose remove() detaches it."""
        seen = {}

        def before(module, args):   # the projection's input is cat(z_t, x)
            seen['z'] = args[0][..., :self.C]

        def after(module, args, out):
            fn(seen.pop('z'), out)

        return _Handles([self.implicit_block_projection.register_forward_pre_hook(before),
                         self.implicit_block.register_forward_hook(after)])

    def _split(self, items):
        p = self.pre_depth
        return items[:p], items[p], items[p + 1:]

    def implicit_step(self, z_BLC, inj_BLC, ada_imp, attn_bias, kv: Optional[KVCache] = None):
        """One iteration G(z) = f(Proj([z, x]), c)."""
        return self.implicit_block(self.implicit_block_projection(torch.cat((z_BLC, inj_BLC), dim=-1)), ada_imp, attn_bias, kv)

    def train_backbone(self, x_BLC, ada, attn_bias, jfb_iters):
        ada_pre, ada_imp, ada_post = self._split(ada)
        for block, a in zip(self.pre_blocks, ada_pre):
            x_BLC = self._run_block(block, x_BLC, a, attn_bias)
        n, m = jfb_iters if jfb_iters is not None else self.sjfb_plan()
        inj_BLC = x_BLC
        with torch.no_grad():   # n iterations that cost no activation memory
            z_BLC = x_BLC.detach()
            for _ in range(n):
                z_BLC = self.implicit_step(z_BLC, inj_BLC, ada_imp, attn_bias)
        for _ in range(m):      # backprop only through the last m
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                z_BLC = torch.utils.checkpoint.checkpoint(self.implicit_step, z_BLC, inj_BLC, ada_imp, attn_bias,
                                                          use_reentrant=False)
            else:
                z_BLC = self.implicit_step(z_BLC, inj_BLC, ada_imp, attn_bias)
        for block, a in zip(self.post_blocks, ada_post):
            z_BLC = self._run_block(block, z_BLC, a, attn_bias)
        return z_BLC

    def new_infer_state(self, schedule, fill_forward, solver=None):
        counts = None if schedule.adaptive else schedule.counts
        return dict(pre=[KVCache(self.L) for _ in self.pre_blocks],
                    imp=IterKVCaches(self.patch_nums, counts, fill_forward),
                    post=[KVCache(self.L) for _ in self.post_blocks], solver=solver or SolverSpec())

    def infer_backbone(self, x_BlC, ada, state, si, schedule, stats):
        ada_pre, ada_imp, ada_post = self._split(ada)
        for block, a, kv in zip(self.pre_blocks, ada_pre, state['pre']):
            x_BlC = block(x_BlC, a, None, kv)
        caches: IterKVCaches = state['imp']
        tau = schedule.tau[si] if schedule.adaptive else None
        z_BlC, st = state['solver'].solve(
            lambda z, t: self.implicit_step(z, x_BlC, ada_imp, None, caches.get(t)), x_BlC,
            max_iter=schedule.counts[si], tau=tau, stop_mode=schedule.stop_mode, min_iter=schedule.min_iters)
        caches.end_scale(st.iters)
        stats.iters.append(st.iters)
        stats.residuals.append(st.residual)
        for block, a, kv in zip(self.post_blocks, ada_post, state['post']):
            z_BlC = block(z_BlC, a, None, kv)
        return z_BlC
