"""VARTrainer: one training step (tokenise, teacher-forced forward, weighted CE, backward/step) and evaluation.

Shapes: B batch, L tokens over all scales, l tokens of one scale, V vocabulary.
The loss is the official one: per-token cross-entropy (with label smoothing) weighted 1/L per token, summed over
tokens and averaged over the batch; in progressive training only the scales up to `prog_si` count and the newest
one is ramped in. How S-JFB, class-dropout and drop-path draws are keyed (`jfb_draw`, `drop_draw`):
docs/FAITHFULNESS.md.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dist
from utils.data.token_cache import split_scales, tokenize_images
from utils.train.amp_opt import AmpOptimizer
from utils.train.ema import ModelEMA
from utils.train.lr_control import prog_warmup
from utils.train.sharded_ckpt import optim_by_name


class StepHooks:
    """Called at fixed points of every step (numbered from 1, as in the logs); the base class changes nothing. Pass
    a subclass as `train.main(argv, hooks=...)` (tests/hooked_train.py injects faults)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss step `step` backpropagates."""
        return loss

    def after_step(self, step: int):
        """Called on every rank after step `step` (and its validation and checkpoint, when due)."""


@dataclass
class StepStats:
    """Metrics of one training step (floats, this rank; loss_finite is agreed over ranks)."""
    loss: float                       # the optimised loss (smoothed CE, weighted)
    L_mean: float                     # plain CE over all trained tokens
    L_tail: float                     # plain CE over the last scale (-1 in progressive stages)
    acc_mean: float                   # top-1 accuracy %, all trained tokens
    acc_tail: float                   # top-1 accuracy %, last scale (-1 in progressive stages)
    scale_loss: List[float] = field(default_factory=list)   # plain CE per trained scale
    n: Optional[int] = None           # S-JFB iterations without grad (None: no implicit block)
    m: Optional[int] = None           # S-JFB iterations with grad
    loss_finite: bool = True
    stepped: bool = False             # the optimizer stepped on this call
    grad_norm: Optional[float] = None
    scale_log2: Optional[float] = None


@dataclass
class ProgState:
    """Progressive-training bookkeeping carried across steps (and checkpoints)."""
    prog_it: int = 0
    last_prog_si: int = -1
    first_prog: bool = True

    def advance(self, prog_si: int, prog_wp_it: float) -> float:
        """Count a step at stage prog_si; returns the newest scale's loss weight."""
        if prog_si != self.last_prog_si:
            if self.last_prog_si != -1:
                self.first_prog = False
            self.last_prog_si, self.prog_it = prog_si, 0
        self.prog_it += 1
        return prog_warmup(self.prog_it, prog_wp_it, self.first_prog)


def token_weights(begin_ends: List[Tuple[int, int]], L: int, prog_si: int, prog_wp: float,
                  device=None) -> torch.Tensor:
    """(1, ed) loss weight per token: 1/L each; in a progressive stage the newest scale is scaled by prog_wp."""
    if prog_si < 0:
        return torch.full((1, L), 1.0 / L, device=device)
    bg, ed = begin_ends[prog_si]
    w = torch.full((1, ed), 1.0 / L, device=device)
    w[:, bg:ed] *= min(max(prog_wp, 0.0), 1.0)
    return w


class VARTrainer:
    """Trains a VAR/VIAR (possibly DDP-wrapped) on images tokenised on the fly by a frozen VQVAE, or on cached tokens."""

    def __init__(self, vae: nn.Module, var_wo_ddp: nn.Module, var: nn.Module, opt: AmpOptimizer,
                 label_smooth: float = 0.0, seed: int = 0, ema: Optional[ModelEMA] = None, jfb_draw: str = 'step',
                 hooks: Optional[StepHooks] = None, drop_draw: str = 'step'):
        self.vae = vae
        self.var_wo_ddp, self.var, self.opt, self.ema = var_wo_ddp, var, opt, ema
        self.label_smooth, self.seed = label_smooth, seed
        for name, value in (('jfb_draw', jfb_draw), ('drop_draw', drop_draw)):
            if value not in ('step', 'rank'):
                raise ValueError(f"{name} must be 'step' or 'rank', got {value!r}")
        self.draw_per_step, self.drop_per_step = jfb_draw == 'step', drop_draw == 'step'
        self.hooks = hooks or StepHooks()
        self.patch_nums = tuple(var_wo_ddp.patch_nums)
        self.begin_ends = list(var_wo_ddp.begin_ends)
        self.L = var_wo_ddp.L
        self.prog = ProgState()

    # ---- pieces
    @torch.no_grad()
    def tokenize(self, img_B3HW: torch.Tensor, prog_si: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """(targets gt_BL, teacher-forcing input x_BLCv_wo_first_l) from images in [-1, 1], or from the (B, L)
        integer token indices of a token cache, which skip the encoder (up to scale prog_si)."""
        if img_B3HW.is_floating_point():
            idx_Bl = tokenize_images(self.vae, img_B3HW, prog_si)
        else:
            idx_Bl = split_scales(img_B3HW, self.patch_nums, prog_si)
        return torch.cat(idx_Bl, dim=1), self.vae.quantize.idxBl_to_var_input(idx_Bl, prog_si=prog_si)

    def draw_jfb(self, g_it: int) -> Optional[Tuple[int, int]]:
        """S-JFB (n, m) of global step g_it, from the model (None for VAR); identical on every rank unless
        jfb_draw == 'rank' (the official per-rank draw)."""
        return self.var_wo_ddp.draw_jfb_iters(g_it if self.draw_per_step else None, self.seed)

    def batch_draws(self, g_it: int, rows: int, jfb_iters: Optional[Tuple[int, int]], device):
        """Class-dropout and drop-path draws of step g_it for this rank's rows of the global batch (None: the model
        draws them from the global generator, drop_draw == 'rank')."""
        if not self.drop_per_step:
            return None
        world = dist.get_world_size()
        return self.var_wo_ddp.training_draws(self.seed, g_it, dist.get_rank() * rows, rows, rows * world,
                                              jfb_iters, device)

    def _metrics(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, ce_BL: torch.Tensor, trained_si: int
                 ) -> torch.Tensor:
        """[L_mean, L_tail, acc_mean, acc_tail, per-scale CE...] as one tensor (one sync to read)."""
        hit_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float()
        full = trained_si < 0
        tail = slice(self.L - self.patch_nums[-1] ** 2, self.L)
        neg = ce_BL.new_tensor(-1.0)
        per_scale = [ce_BL[:, bg:ed].mean() for si, (bg, ed) in enumerate(self.begin_ends) if full or si <= trained_si]
        return torch.stack([ce_BL.mean(), ce_BL[:, tail].mean() if full else neg, hit_BL.mean() * 100,
                            hit_BL[:, tail].mean() * 100 if full else neg, *per_scale])

    # ---- training
    def train_step(self, img_B3HW: torch.Tensor, label_B: torch.Tensor, g_it: int, stepping: bool,
                   prog_si: int = -1, prog_wp_it: float = 1.0) -> StepStats:
        """One forward/backward on this rank's batch; steps the optimizer when `stepping`. A loss that is not finite
        on any rank drops the window's grads on every rank; that is agreed on the device and read once the backward
        is queued, so the host never waits for the GPU before it (such a backward runs and is thrown away)."""
        prog_wp = self.prog.advance(prog_si, prog_wp_it)
        gt_BL, x_BLCv = self.tokenize(img_B3HW, prog_si)
        jfb_iters = self.draw_jfb(g_it)
        draws = self.batch_draws(g_it, label_B.shape[0], jfb_iters, label_B.device)
        sync = self.var.no_sync() if not stepping and hasattr(self.var, 'no_sync') else contextlib.nullcontext()
        with sync:
            with self.opt.amp_ctx():
                logits_BLV = self.var(label_B, x_BLCv, jfb_iters=jfb_iters, prog_si=prog_si, draws=draws)
            ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), gt_BL, reduction='none',
                                    label_smoothing=self.label_smooth)
            w_1L = token_weights(self.begin_ends, self.L, prog_si, prog_wp, device=ce_BL.device)
            loss = self.hooks.loss(g_it + 1, ce_BL.mul(w_1L).sum(dim=-1).mean())
            bad_1 = dist.allreduce_sum(loss.detach().isfinite().logical_not().float().reshape(1))
            self.opt.backward(loss)
        finite = bad_1.item() == 0   # the first host read of this step, after the backward is queued
        res = None
        if not finite:
            self.opt.skip()
        elif stepping:
            res = self.opt.step()
            if res.stepped and self.ema is not None:
                self.ema.update(self.var_wo_ddp)
        with torch.no_grad():
            plain_BL = ce_BL.detach() if self.label_smooth == 0 else \
                F.cross_entropy(logits_BLV.detach().float().transpose(1, 2), gt_BL, reduction='none')
            vals = self._metrics(logits_BLV.detach(), gt_BL, plain_BL, prog_si).tolist()
        n, m = jfb_iters if jfb_iters is not None else (None, None)
        return StepStats(loss=float(loss.item()), L_mean=vals[0], L_tail=vals[1], acc_mean=vals[2], acc_tail=vals[3],
                         scale_loss=vals[4:], n=n, m=m, loss_finite=finite,
                         stepped=bool(res and res.stepped), grad_norm=res.grad_norm if res else None,
                         scale_log2=res.scale_log2 if res else None)

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, loader, seed: int = 0) -> Dict[str, float]:
        """Val CE and accuracy (all tokens and last scale), summed over ranks. The model drops labels in eval too (as
        official), drawn in an RNG forked and seeded by `seed`: evaluations compare, training draws stay untouched."""
        training = self.var_wo_ddp.training
        self.var_wo_ddp.eval()
        dev = dist.get_device()
        sums = torch.zeros(5, device=dev)
        devices = [dev] if dev.type == 'cuda' else []
        # a sharded model gathers its weights in every forward, so every rank runs as many as the one with the most
        # batches (a rank with fewer repeats its last batch and counts nothing)
        calls = len(loader)
        if self.sharded:
            calls = int(dist.allreduce_max(torch.tensor([calls], device=dev)).item())
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + dist.get_rank())
            batch, it = None, iter(loader)
            for k in range(calls):
                if k < len(loader):
                    batch, counts = next(it), True
                else:   # the forward must run; a rank without a single batch borrows the first sample
                    batch = batch if batch is not None else next(iter(DataLoader(loader.dataset, batch_size=1)))
                    counts = False
                img_B3HW, label_B = (t.to(dev, non_blocking=True) for t in batch)
                gt_BL, x_BLCv = self.tokenize(img_B3HW)
                with self.opt.amp_ctx():
                    logits_BLV = self.var_wo_ddp(label_B, x_BLCv, jfb_iters=self.var_wo_ddp.eval_jfb_iters())
                if not counts:
                    continue
                ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), gt_BL, reduction='none')
                v = self._metrics(logits_BLV, gt_BL, ce_BL, -1)
                B = gt_BL.shape[0]
                sums += torch.stack([v[0] * B, v[1] * B, v[2] * B, v[3] * B, v.new_tensor(float(B))])
        self.var_wo_ddp.train(training)
        dist.allreduce_sum(sums)
        tot = max(sums[4].item(), 1.0)
        L_mean, L_tail, acc_mean, acc_tail = (sums[:4] / tot).tolist()
        return dict(L_mean=L_mean, L_tail=L_tail, acc_mean=acc_mean, acc_tail=acc_tail, count=int(sums[4].item()))

    # ---- state
    def weights_finite(self) -> bool:
        """Every transformer weight (and the EMA) is finite (this rank's shards, agreed over ranks when sharded)."""
        names = [n for n, _ in self.var_wo_ddp.named_parameters()]
        ok = all(torch.isfinite(dist.local_part(p)).all() for p in self.var_wo_ddp.parameters())
        if ok and self.ema is not None:   # parameters only: the attention-mask buffer holds -inf by design
            ok = all(torch.isfinite(dist.local_part(self.ema.shadow[n])).all() for n in names)
        if self.sharded:
            bad = torch.tensor([0.0 if ok else 1.0], device=dist.get_device())
            ok = dist.allreduce_sum(bad).item() == 0
        return bool(ok)

    @property
    def sharded(self) -> bool:
        """The transformer's parameters are FSDP2 shards (train.py --fsdp on several ranks)."""
        return any(dist.is_sharded(p) for p in self.var_wo_ddp.parameters())

    def state_dict(self, with_vae: bool = False) -> Dict:
        """Transformer weights, optimizer/scaler, EMA and progressive state (official key names)."""
        sd = {'var_wo_ddp': self.var_wo_ddp.state_dict(), 'var_opt': self.opt.state_dict(), 'config': self._config()}
        if self.ema is not None:
            sd['ema'] = self.ema.state_dict()
        if with_vae:
            sd['vae_local'] = self.vae.state_dict()
        return sd

    def load_state_dict(self, sd: Dict):
        """Restore what state_dict saved but the VQVAE (built from its own source); a sharded model takes its shards."""
        if self.sharded:   # a DDP checkpoint resumed under --fsdp: every rank reads the whole file, keeps its shards
            name_of = {id(p): n for n, p in self.var_wo_ddp.named_parameters()}   # the optimizer's index order:
            names = [name_of[id(p)] for g in self.opt.optimizer.param_groups for p in g['params']]
            osd = optim_by_name(sd['var_opt']['optimizer'], names)
            dist.set_model_optim_state(self.var_wo_ddp, self.opt.optimizer, sd['var_wo_ddp'], osd, full=True)
            if self.opt.scaler is not None and 'scaler' in sd['var_opt']:
                self.opt.scaler.load_state_dict(sd['var_opt']['scaler'])
        else:
            self.var_wo_ddp.load_state_dict(sd['var_wo_ddp'], strict=True)
            self.opt.load_state_dict(sd['var_opt'])
        if self.ema is not None and 'ema' in sd:
            self.ema.load_state_dict(sd['ema'])
        self._load_prog(sd)

    def _config(self) -> Dict:
        """The plain training state both checkpoint formats keep (official key names)."""
        return {'patch_nums': self.patch_nums, 'label_smooth': self.label_smooth, 'prog_it': self.prog.prog_it,
                'last_prog_si': self.prog.last_prog_si, 'first_prog': self.prog.first_prog}

    def _load_prog(self, sd: Dict):
        """The progressive-training state _config saved."""
        cfg = sd.get('config', {})
        self.prog = ProgState(cfg.get('prog_it', 0), cfg.get('last_prog_si', -1), cfg.get('first_prog', True))

    def sharded_state_dict(self, with_vae: bool = False) -> Tuple[Dict, Dict]:
        """(tensors, plain): the model, AdamW state and EMA keyed by parameter name as this rank holds them (what a
        sharded checkpoint's shard files hold and load into), and the plain rest (hyper-parameters, scaler, ...)."""
        model_sd, optim_sd = dist.model_optim_state(self.var_wo_ddp, self.opt.optimizer)
        tensors = {'model': model_sd, 'optim': optim_sd['state']}
        plain = {'optim_groups': optim_sd['param_groups'], 'config': self._config()}
        if self.opt.scaler is not None:
            plain['scaler'] = self.opt.scaler.state_dict()
        if self.ema is not None:
            tensors['ema'] = self.ema.shadow
            plain['ema'] = {'decay': self.ema.decay, 'num_updates': self.ema.num_updates}
        if with_vae:
            plain['vae_local'] = self.vae.state_dict()
        return tensors, plain

    def load_sharded_state_dict(self, tensors: Dict, plain: Dict):
        """Restore from sharded_state_dict's pair but the VQVAE, the tensors already filled from a checkpoint (in
        place: the EMA's are its own shadow tensors)."""
        dist.set_model_optim_state(self.var_wo_ddp, self.opt.optimizer, tensors['model'],
                                   {'state': tensors['optim'], 'param_groups': plain['optim_groups']})
        if self.opt.scaler is not None and 'scaler' in plain:
            self.opt.scaler.load_state_dict(plain['scaler'])
        if self.ema is not None and 'ema' in plain:
            self.ema.num_updates = plain['ema']['num_updates']
        self._load_prog(plain)
