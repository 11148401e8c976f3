"""VIAR: VAR whose deep middle stack is one weight-shared implicit block iterated to a fixed point.

Shapes: B batch, L tokens, l tokens of one scale, C width.
Each iteration is z <- f(Proj([z, x]), c): x is the pre-blocks' output (input injection),
z0 = x, Proj = Linear(2C, 2C) -> GELU(tanh) -> Linear(2C, C). Training uses S-JFB: n iterations
without grad, then m with grad, so memory does not grow with the effective depth.
The sampling fast path splits Proj's first Linear over [z, x]: W [z, x] + b = W_z z + (W_x x + b), the
bracket computed once per scale (`injection`), W_z and W_x views of the one weight.
"""
import functools
import random
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from models.blocks import AdaLNSelfAttn
from models.kv_cache import IterKVCaches, KVCache, new_buffer, reserve_slot
from models.solver import SolverSpec
from models.var import VARBase


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
        self._iterate_hooks = OrderedDict()   # register_iterate_hook; called by the sampling scale loop

    def build_backbone(self):
        C, depth = self.C, self.depth
        if self.pre_depth + self.post_depth >= depth:
            raise ValueError(f'pre_depth + post_depth ({self.pre_depth}+{self.post_depth}) must be < depth ({depth})')
        self.implicit_block_projection = nn.Sequential(nn.Linear(2 * C, 2 * C), nn.GELU(approximate='tanh'),
                                                       nn.Linear(2 * C, C))
        self.pre_blocks = nn.ModuleList([self._make_block(i) for i in range(self.pre_depth)])
        # the implicit block is built like block depth // 2 of the explicit stack
        self.implicit_block = self._make_block(depth // 2)
        self.post_blocks = nn.ModuleList([self._make_block(i) for i in range(depth - self.post_depth, depth)])

    def backbone_blocks(self) -> List[AdaLNSelfAttn]:
        return [*self.pre_blocks, self.implicit_block, *self.post_blocks]

    # ---- answers to the questions VARBase asks
    def draw_jfb_iters(self, step: Optional[int] = None, seed: int = 0) -> Tuple[int, int]:
        """(n, m) of a training step, n ~ U{jfb_no_grad}, m ~ U{jfb_with_grad} (inclusive bounds): identical on every
        rank for a given (seed, step); step=None draws from Python's global `random`, seeded per rank (the official
        code's draw)."""
        rng = random if step is None else random.Random(f'sjfb-{seed}-{step}')
        return rng.randint(*self.jfb_no_grad), rng.randint(*self.jfb_with_grad)

    def drop_path_probs(self, jfb_iters: Optional[Tuple[int, int]] = None) -> List[float]:
        """Pre-blocks, then the implicit block once per iteration (n + m), then post-blocks."""
        n, m = jfb_iters if jfb_iters is not None else (0, 0)
        rate = lambda blocks: [b.drop_path.drop_prob for b in blocks]  # noqa: E731
        return rate(self.pre_blocks) + rate([self.implicit_block]) * (n + m) + rate(self.post_blocks)

    def sharded_blocks(self) -> List[AdaLNSelfAttn]:
        """Pre- and post-blocks. The implicit block and its projection stay in the root's unit: FSDP then gathers
        them once per step for all n + m iterations (and reduces their gradients once), where a unit of their own
        would count every iteration as a use."""
        return [*self.pre_blocks, *self.post_blocks]

    def eval_jfb_iters(self) -> Tuple[int, int]:
        """The rounded means of the S-JFB ranges."""
        (n0, n1), (m0, m1) = self.jfb_no_grad, self.jfb_with_grad
        return round((n0 + n1) / 2), round((m0 + m1) / 2)

    def scale_loop_modules(self) -> List[nn.Module]:
        return [*super().scale_loop_modules(), self.implicit_block_projection]

    def register_iterate_hook(self, fn):
        """fn(z_t, z_next) after every implicit iteration during sampling (z_t: the iterate G was called at,
        z_next = G(z_t); on the exact and the fast path alike); returns a handle whose remove() detaches it."""
        handle = RemovableHandle(self._iterate_hooks)
        self._iterate_hooks[handle.id] = fn
        return handle

    def shared_with_copies(self):
        """Also the iterate hooks, so that a hook registered on this model watches its copies' sampling too."""
        return [*super().shared_with_copies(), self._iterate_hooks]

    def _split(self, items):
        p = self.pre_depth
        return items[:p], items[p], items[p + 1:]

    def implicit_step(self, z_BLC, inj_BLC, ada_imp, attn_bias, kv: Optional[KVCache] = None, keep_2B=None):
        """One iteration G(z) = f(Proj([z, x]), c) (keep_2B: its drop-path scales, models/draws.py)."""
        return self.implicit_block(self.implicit_block_projection(torch.cat((z_BLC, inj_BLC), dim=-1)), ada_imp,
                                   attn_bias, kv, keep_2B)

    def injection(self, x_BlC):
        """Fast path, once per scale: (W_x x + b, W_z) of Proj's first Linear, W = [W_z | W_x] (2C, 2C), in the
        matmul dtype (autocast's, else the weight's: then W_z is a view of the parameter)."""
        lin = self.implicit_block_projection[0]
        W, b = lin.weight, lin.bias
        dev = x_BlC.device.type
        if torch.is_autocast_enabled(dev):   # cast once per scale: autocast would cast the W_z view every iteration
            W, b = W.to(torch.get_autocast_dtype(dev)), b.to(torch.get_autocast_dtype(dev))
        return F.linear(x_BlC.to(W.dtype), W[:, self.C:], b), W[:, :self.C]

    def implicit_step_hoisted(self, z_BlC, inj_Bl2C, W_z, ada_imp, attn_bias, kv: Optional[KVCache] = None):
        """G(z) as `implicit_step`, with the injection precomputed: Linear(2C, 2C)([z, x]) = z W_z^T + inj."""
        _, act, lin2 = self.implicit_block_projection
        h_N2C = torch.addmm(inj_Bl2C.flatten(0, 1), z_BlC.flatten(0, 1).to(W_z.dtype), W_z.t())
        h_BlC = lin2(act(h_N2C.view_as(inj_Bl2C)))
        return self.implicit_block(h_BlC, ada_imp, attn_bias, kv)

    def train_backbone(self, x_BLC, ada, attn_bias, jfb_iters, path_keep_K2B=None):
        ada_pre, ada_imp, ada_post = self._split(ada)
        p = self.pre_depth
        n, m = jfb_iters if jfb_iters is not None else self.draw_jfb_iters()   # Python's random: no torch draw moves
        keep = self._call_keeps(path_keep_K2B, p + n + m + len(self.post_blocks))
        for k, (block, a) in enumerate(zip(self.pre_blocks, ada_pre)):
            x_BLC = self._checkpointed(block, x_BLC, a, attn_bias, None, keep(k))
        inj_BLC = x_BLC
        with torch.no_grad():   # n iterations that cost no activation memory
            z_BLC = x_BLC.detach()
            for t in range(n):
                z_BLC = self.implicit_step(z_BLC, inj_BLC, ada_imp, attn_bias, None, keep(p + t))
        for t in range(n, n + m):      # backprop only through the last m
            z_BLC = self._checkpointed(self.implicit_step, z_BLC, inj_BLC, ada_imp, attn_bias, None, keep(p + t))
        for j, (block, a) in enumerate(zip(self.post_blocks, ada_post)):
            z_BLC = self._checkpointed(block, z_BLC, a, attn_bias, None, keep(p + n + m + j))
        return z_BLC

    def new_infer_state(self, schedule, fill_forward, solver=None, fast=False, alloc=new_buffer):
        counts = None if schedule.adaptive else schedule.counts
        return dict(pre=[KVCache(self.L, alloc) for _ in self.pre_blocks],
                    imp=IterKVCaches(self.patch_nums, counts, fill_forward, alloc),
                    post=[KVCache(self.L, alloc) for _ in self.post_blocks], solver=solver or SolverSpec(), fast=fast)

    def _scale_map(self, x_BlC, ada_imp, kv_at, fast: bool):
        """G(z, t) of one scale: iteration t attends through, and writes this scale into, kv_at(t) (KV cache t);
        the iterate hooks see every call. The contract for solvers: call G once per t = 0, 1, ... in order
        (IterKVCaches.get raises on a second call at one t)."""
        if fast:
            inj_Bl2C, W_z = self.injection(x_BlC)
            G = lambda z, t: self.implicit_step_hoisted(z, inj_Bl2C, W_z, ada_imp, None, kv_at(t))  # noqa: E731
        else:
            G = lambda z, t: self.implicit_step(z, x_BlC, ada_imp, None, kv_at(t))  # noqa: E731
        if not self._iterate_hooks:
            return G

        def watched(z, t):
            z_next = G(z, t)
            for fn in list(self._iterate_hooks.values()):
                fn(z, z_next)
            return z_next
        return watched

    def _cached_pass(self, x_BlC, ada, pre, kv_at, post, fast: bool, solve):
        """One scale through the pre-blocks, the implicit block's solve (G(z, t) writes kv_at(t)) and the
        post-blocks, each writing its KV cache or reserved slot: (h_BlC, SolveStats)."""
        ada_pre, ada_imp, ada_post = self._split(ada)
        for block, a, kv in zip(self.pre_blocks, ada_pre, pre):
            x_BlC = block(x_BlC, a, None, kv)
        z_BlC, st = solve(self._scale_map(x_BlC, ada_imp, kv_at, fast), x_BlC)
        for block, a, kv in zip(self.post_blocks, ada_post, post):
            z_BlC = block(z_BlC, a, None, kv)
        return z_BlC, st

    def infer_backbone(self, x_BlC, ada, state, si, schedule, stats):
        caches: IterKVCaches = state['imp']
        solve = functools.partial(state['solver'].solve, max_iter=schedule.counts[si], stop_mode=schedule.stop_mode,
                                  tau=schedule.tau[si] if schedule.adaptive else None, min_iter=schedule.min_iters)
        z_BlC, st = self._cached_pass(x_BlC, ada, state['pre'], caches.get, state['post'], state['fast'], solve)
        self._end_scale(state, st.iters, st.residual, stats)
        return z_BlC

    def scale_slots(self, state, si, like, schedule):
        """Slots for the pre- and post-blocks and one per iteration of a fixed count; None where the count depends
        on the residual (adaptive) or iterate hooks watch the iterations."""
        if schedule.adaptive or self._iterate_hooks:
            return None
        l, caches = self.patch_nums[si] ** 2, state['imp']
        slot = lambda kv: reserve_slot(kv, l, like)  # noqa: E731
        imp = [slot(caches.get(t)) for t in range(schedule.counts[si])]
        return dict(pre=[slot(kv) for kv in state['pre']], imp=imp,
                    post=[slot(kv) for kv in state['post']], fast=state['fast'], stop_mode=schedule.stop_mode,
                    solver=state['solver'])

    def slot_backbone(self, x_RlC, ada, slots):
        imp = slots['imp']
        solve = functools.partial(slots['solver'].solve, max_iter=len(imp), stop_mode=slots['stop_mode'])
        h_RlC, st = self._cached_pass(x_RlC, ada, slots['pre'], imp.__getitem__, slots['post'], slots['fast'], solve)
        return h_RlC, st.residual

    def end_slots(self, state, slots, residual, stats):
        self._end_scale(state, len(slots['imp']), residual, stats)

    @staticmethod
    def _end_scale(state, iters: int, residual, stats):
        """After a scale ran `iters` implicit iterations: fill the iteration caches forward, record the stats."""
        state['imp'].end_scale(iters)
        stats.iters.append(iters)
        stats.residuals.append(residual)
