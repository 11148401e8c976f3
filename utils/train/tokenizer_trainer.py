"""Training of the multi-scale residual VQVAE tokenizer (the official VAR release ships only the trained file).

Loss per step: reconstruction (L2, or L1 + L2) on [-1, 1] images plus the quantizer's codebook and
commitment loss; AdamW with warmup + cosine decay; code usage EMA updated every step. Checkpoints hold
`{'model': state_dict, 'config': ...}`, which `load_tokenizer` rebuilds from the file alone.
Single process; the official perceptual and GAN losses of VQGAN-style training are not included.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from models.quant import VectorQuantizer2, usage_margin
from models.vqvae import VQVAE
from utils.atomic import check_writable
from utils.checkpoint import CheckpointError, load_vae_weights, read_checkpoint, save_atomic
from utils.cli import flag
from utils.data.datasets import build_datasets
from utils.data.sampler import DistInfiniteBatchSampler
from utils.logging_util import ScalarWriter, get_logger

LAST_CKPT = 'vae-ckpt-last.pth'   # resumable: model, optimizer, step, RNG
EXPORT = 'vae.pth'                # model + config only, for train.py --vae_ckpt / gen_img.py --vae_ckpt
FORMAT = 'viar-vqvae-v1'


@dataclass
class TokenizerConfig:
    """Everything a tokenizer run needs; the CLI of train_tokenizer.py is generated from these fields."""
    data_path: str = flag('', 'image folder with train/<class>/* and val/<class>/*')
    out_dir: str = flag('local_output/vae', 'checkpoints, log.txt and tensorboard')
    reso: int = flag(256, 'image side; must be last patch num * 2**(len(ch_mult)-1)')
    patch_nums: Tuple[int, ...] = flag((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 'scales')
    V: int = flag(4096, 'codebook size')
    Cvae: int = flag(32, 'code dimension')
    ch: int = flag(160, 'base channels of encoder/decoder')
    ch_mult: Tuple[int, ...] = flag((1, 1, 2, 2, 4), 'channel multiplier per level')
    num_res_blocks: int = flag(2, 'res blocks per level')
    share_quant_resi: int = flag(4, 'shared Phi convs (0: one per scale)')
    quant_resi: float = flag(0.5, 'Phi residual ratio')
    beta: float = flag(0.25, 'commitment loss weight')
    vq_weight: float = flag(1.0, 'weight of the quantizer loss')
    l1_weight: float = flag(0.0, 'add this times L1 to the L2 reconstruction loss')
    bs: int = flag(64, 'batch size')
    lr: float = flag(1e-3, 'peak AdamW learning rate')
    wd: float = flag(0.0, 'AdamW weight decay')
    warmup_steps: int = flag(20, 'linear warmup steps')
    final_lr_ratio: float = flag(0.1, 'cosine decay ends at lr * this')
    clip: float = flag(2.0, 'gradient-norm clip (0 = off)')
    restart_every: int = flag(0, 'every N steps replace unused codes by residual vectors of the current batch (0 = off; '
                                 'not in the official recipe; step 0 then initialises the codebook from data)')
    restart_until: float = flag(0.8, 'no code restarts after this fraction of steps')
    max_steps: int = flag(1000, 'optimizer steps in total')
    mid_reso: float = flag(1.125, 'aug: resize to mid_reso*reso, then random (train) or centre (val) crop')
    hflip: bool = flag(False, 'train aug: random horizontal flip')
    workers: int = flag(0, 'data loader workers')
    seed: int = flag(0, 'seed of init, data order and augmentation')
    log_every: int = flag(50, 'print and log every N steps')
    save_every: int = flag(500, 'write the resumable checkpoint every N steps')
    stop_at: int = flag(-1, 'time box: stop after step N with only the resumable checkpoint written; rerun to '
                            'continue (-1: off)')
    resume: bool = flag(True, 'continue from out_dir/vae-ckpt-last.pth if present')
    tensorboard: bool = flag(True, 'write tensorboard scalars to out_dir/tb-vae')
    device: str = flag('cpu', 'cpu or cuda')

    def arch(self) -> Dict[str, Any]:
        """The architecture, in ModelSpec's names (V, Cvae, vae_ch, ...) plus the quantizer settings."""
        return dict(V=self.V, Cvae=self.Cvae, vae_ch=self.ch, vae_ch_mult=tuple(self.ch_mult),
                    vae_num_res_blocks=self.num_res_blocks, patch_nums=tuple(self.patch_nums),
                    share_quant_resi=self.share_quant_resi, quant_resi=self.quant_resi, beta=self.beta,
                    reso=self.reso)


class TokenizerConfigError(ValueError):
    """A tokenizer configuration that cannot work (sizes that do not fit, missing data)."""


# ----------------------------------------------------------------------------- pure helpers
def lr_at(step: int, max_steps: int, base_lr: float, warmup_steps: int, final_ratio: float) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine decay to base_lr * final_ratio at max_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def check_config(cfg: TokenizerConfig) -> None:
    """Raise TokenizerConfigError if the sizes cannot fit together."""
    down = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.reso != cfg.patch_nums[-1] * down:
        raise TokenizerConfigError(
            f'reso {cfg.reso} does not fit: the latent side reso / {down} (ch_mult {tuple(cfg.ch_mult)}) must equal '
            f'the last patch num {cfg.patch_nums[-1]}; use --reso {cfg.patch_nums[-1] * down} or change --ch_mult')
    if list(cfg.patch_nums) != sorted(set(cfg.patch_nums)):
        raise TokenizerConfigError(f'patch_nums {tuple(cfg.patch_nums)} must be strictly increasing')
    if cfg.bs < 1 or cfg.max_steps < 0 or cfg.V < 2 or cfg.Cvae < 1:
        raise TokenizerConfigError('bs, V and Cvae must be positive and max_steps >= 0')


def build_tokenizer(arch: Dict[str, Any], train: bool) -> VQVAE:
    """A VQVAE for an architecture dict (`TokenizerConfig.arch()` or a file's 'config')."""
    return VQVAE(vocab_size=arch['V'], z_channels=arch['Cvae'], ch=arch['vae_ch'],
                 beta=arch.get('beta', 0.25), quant_resi=arch.get('quant_resi', 0.5),
                 share_quant_resi=arch['share_quant_resi'], v_patch_nums=tuple(arch['patch_nums']),
                 ch_mult=tuple(arch['vae_ch_mult']), num_res_blocks=arch['vae_num_res_blocks'], test_mode=not train)


def load_tokenizer(path: str, device='cpu') -> Tuple[VQVAE, Dict[str, Any]]:
    """Rebuild a tokenizer written by this trainer from its file alone; returns (vae in eval mode, arch)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'tokenizer file {path!r} does not exist; train one with train_tokenizer.py')
    obj = read_checkpoint(path)   # weights only: a file that asks to run code is refused
    if not (isinstance(obj, dict) and isinstance(obj.get('config'), dict)):
        raise CheckpointError(f'{path} records no tokenizer config; pass the sizes with flags instead '
                              f'(--V --Cvae --vae_ch --vae_ch_mult --vae_num_res_blocks --patch_nums)')
    vae = build_tokenizer(obj['config'], train=False)
    load_vae_weights(vae, obj, where=path)
    return vae.to(device).eval(), obj['config']


# ----------------------------------------------------------------------------- codebook restarts
@torch.no_grad()
def scale_residuals(quantizer: VectorQuantizer2, f_BChw: torch.Tensor) -> List[torch.Tensor]:
    """The vectors (N_k, C) the quantizer matches to codes at each scale k: f - f_hat so far, pooled to pn_k."""
    B, C, H, W = f_BChw.shape
    f_hats = quantizer.f_to_idxBl_or_fhat(f_BChw, to_fhat=True)
    prev_BChw = torch.zeros_like(f_BChw)
    out = []
    for si, pn in enumerate(quantizer.v_patch_nums):
        rest_BChw = f_BChw - prev_BChw
        if pn != H:
            rest_BChw = F.interpolate(rest_BChw, size=(pn, pn), mode='area')
        out.append(rest_BChw.permute(0, 2, 3, 1).reshape(-1, C))
        prev_BChw = f_hats[si]
    return out


@torch.no_grad()
def restart_dead_codes(quantizer: VectorQuantizer2, f_BChw: torch.Tensor, generator: torch.Generator) -> int:
    """Move codes that no scale uses (usage EMA below the margin) onto random residual vectors of f; returns how
    many moved (all before the first usage update: a data init). Each gets the margin as its usage, so it has time
    to be picked before the next restart."""
    B, C, H, W = f_BChw.shape
    margin = usage_margin(B * H * W, quantizer.vocab_size)
    dead_V = quantizer.ema_vocab_hit_SV.max(dim=0).values < margin
    n_dead = int(dead_V.sum())
    if n_dead == 0:
        return 0
    pool_NC = torch.cat(scale_residuals(quantizer, f_BChw.float()), dim=0)
    pick = torch.randint(pool_NC.shape[0], (n_dead,), generator=generator)
    quantizer.embedding.weight.data[dead_V] = pool_NC[pick].to(quantizer.embedding.weight.dtype)
    quantizer.ema_vocab_hit_SV[:, dead_V] = margin
    return n_dead


# ----------------------------------------------------------------------------- data
def batch_stream(train_set, bs: int, seed: int, start_step: int, workers: int) -> Iterator[torch.Tensor]:
    """Image batches (B, 3, H, W) from `start_step` on, exactly those a run from step 0 would see there."""
    sampler = DistInfiniteBatchSampler(len(train_set), bs, seed=seed)
    sampler.load_state_dict(sampler.position_at(start_step))
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=workers)
    for img_B3HW, _ in loader:
        yield img_B3HW


@torch.no_grad()
def recon_mse(vae: VQVAE, dataset, bs: int = 256, device='cpu') -> float:
    """Mean squared error on [-1, 1] between images and their full-scale reconstructions (clamped)."""
    was_training = vae.training
    vae.eval()
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=False)
    for img_B3HW, _ in loader:
        img_B3HW = img_B3HW.to(device)
        rec_B3HW = vae.img_to_reconstructed_img(img_B3HW, last_one=True)
        total += F.mse_loss(rec_B3HW, img_B3HW, reduction='sum').item()
        count += img_B3HW.numel()
    vae.train(was_training)
    return total / max(1, count)


# ----------------------------------------------------------------------------- training
def reconstruction_loss(rec_B3HW: torch.Tensor, img_B3HW: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """L2 (+ l1_weight * L1) between reconstruction and input."""
    loss = F.mse_loss(rec_B3HW, img_B3HW)
    if l1_weight > 0:
        loss = loss + l1_weight * F.l1_loss(rec_B3HW, img_B3HW)
    return loss


def checkpoint_dict(vae: VQVAE, cfg: TokenizerConfig, opt: Optional[torch.optim.Optimizer], step: int,
                    metrics: Dict[str, float]) -> Dict[str, Any]:
    """What a tokenizer file holds; without `opt` it is the export (no optimizer, no RNG)."""
    out = dict(model=vae.state_dict(), config=cfg.arch(), format=FORMAT, step=step, metrics=dict(metrics))
    if opt is not None:
        out.update(optimizer=opt.state_dict(), args=asdict(cfg), record_hit=vae.quantize.record_hit,
                   torch_rng=torch.get_rng_state())
    return out


@dataclass(frozen=True)
class TokenizerEvents:
    """What happens around optimizer step `step` (0-based) of a tokenizer run."""
    restart: bool        # before the step: move dead codes onto data
    log: bool            # after: metrics line, usage and tensorboard
    stop: bool           # after: --stop_at time box (resumable checkpoint only)
    save: bool           # after: the periodic resumable checkpoint


def events_at(step: int, cfg: 'TokenizerConfig') -> TokenizerEvents:
    """The tokenizer run's policy at step `step` (pure)."""
    done = step + 1
    last = done == cfg.max_steps
    return TokenizerEvents(
        restart=cfg.restart_every > 0 and step % cfg.restart_every == 0 and step < cfg.restart_until * cfg.max_steps,
        log=done % cfg.log_every == 0 or last,
        stop=done == cfg.stop_at and not last,
        save=done % cfg.save_every == 0 and not last)


def resume_state(cfg: TokenizerConfig, vae: VQVAE, opt: torch.optim.Optimizer, log) -> int:
    """Load out_dir/vae-ckpt-last.pth into vae and opt when resuming; returns the step to start from."""
    path = os.path.join(cfg.out_dir, LAST_CKPT)
    if not (cfg.resume and os.path.isfile(path)):
        return 0
    obj = read_checkpoint(path)   # weights only: a file that asks to run code is refused (CheckpointError)
    stored = obj.get('config') if isinstance(obj, dict) else None
    if stored != cfg.arch():
        raise TokenizerConfigError(f'{path} was trained with {stored}, not {cfg.arch()}; '
                                   f'use another --out_dir or --resume False')
    load_vae_weights(vae, obj, where=path)
    opt.load_state_dict(obj['optimizer'])
    vae.quantize.record_hit = int(obj.get('record_hit', 0))
    if 'torch_rng' in obj:
        torch.set_rng_state(obj['torch_rng'])
    log.info(f'resumed from {path} at step {obj["step"]}')
    return int(obj['step'])


def train_tokenizer(cfg: TokenizerConfig) -> Dict[str, Any]:
    """Train (or resume) a tokenizer; writes out_dir/vae-ckpt-last.pth and out_dir/vae.pth, returns the metrics."""
    check_config(cfg)
    check_writable(cfg.out_dir)
    device = torch.device(cfg.device)
    _, train_set, val_set = build_datasets(cfg.data_path, cfg.reso, round(cfg.mid_reso * cfg.reso), cfg.hflip)

    torch.manual_seed(cfg.seed)
    vae = build_tokenizer(cfg.arch(), train=True).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.wd, betas=(0.9, 0.95))
    log = get_logger('tokenizer', cfg.out_dir)
    tb = ScalarWriter(os.path.join(cfg.out_dir, 'tb-vae') if cfg.tensorboard else None)
    last_ckpt = os.path.join(cfg.out_dir, LAST_CKPT)
    start = resume_state(cfg, vae, opt, log)
    n_params = sum(p.numel() for p in vae.parameters())
    log.info(f'{n_params / 1e6:.3f}M params, {len(train_set)} train images, steps {start}..{cfg.max_steps}, '
             f'config {json.dumps(cfg.arch())}')

    metrics: Dict[str, float] = {}
    stream = batch_stream(train_set, cfg.bs, cfg.seed, start, cfg.workers)
    t0 = time.time()
    try:
        for step in range(start, cfg.max_steps):
            ev = events_at(step, cfg)
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.final_lr_ratio)
            for group in opt.param_groups:
                group['lr'] = lr
            img_B3HW = next(stream).to(device)
            if ev.restart:
                with torch.no_grad():
                    f_BChw = vae.img_to_f(img_B3HW)
                gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
                n_moved = restart_dead_codes(vae.quantize, f_BChw, gen)
                if n_moved:
                    tb.add('vae', {'restarted_codes': n_moved}, step)
            rec_B3HW, usages, vq_loss = vae(img_B3HW, ret_usages=ev.log)
            rec_loss = reconstruction_loss(rec_B3HW, img_B3HW, cfg.l1_weight)
            loss = rec_loss + cfg.vq_weight * vq_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.clip if cfg.clip > 0 else float('inf'))
            opt.step()
            vae.quantize.update_usage(vae.quantize.last_hit_SV)

            metrics = dict(loss=loss.item(), rec_loss=rec_loss.item(), vq_loss=vq_loss.item())
            if ev.log:
                metrics.update(usage_last=usages[-1], usage_mean=sum(usages) / len(usages), lr=lr,
                               grad_norm=float(grad_norm))
                tb.add('vae', metrics, step + 1)
                tb.flush()
                sec = (time.time() - t0) / (step + 1 - start)
                log.info(f'step {step + 1}/{cfg.max_steps}  loss {metrics["loss"]:.4f}  '
                         f'rec {metrics["rec_loss"]:.4f}  vq {metrics["vq_loss"]:.4f}  '
                         f'usage {metrics["usage_mean"]:.0f}%  lr {lr:.2e}  {sec:.2f}s/step')
            if ev.stop or ev.save:
                save_atomic(checkpoint_dict(vae, cfg, opt, step + 1, metrics), last_ckpt)
            if ev.stop:
                log.info(f'stopped at step {step + 1} (--stop_at); rerun the same command to continue')
                return metrics

        metrics['val_recon_mse'] = recon_mse(vae, val_set, device=device)
        tb.add('vae', {'val_recon_mse': metrics['val_recon_mse']}, cfg.max_steps)
        log.info(f'val reconstruction MSE on [-1, 1]: {metrics["val_recon_mse"]:.5f}')
        save_atomic(checkpoint_dict(vae, cfg, opt, cfg.max_steps, metrics), last_ckpt)
        save_atomic(checkpoint_dict(vae.eval(), cfg, None, cfg.max_steps, metrics), os.path.join(cfg.out_dir, EXPORT))
        log.info(f'wrote {os.path.join(cfg.out_dir, EXPORT)} ({time.time() - t0:.1f}s)')
        return metrics
    finally:
        tb.close()
