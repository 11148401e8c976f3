"""Train VAR or VIAR on an ImageNet-style folder: `torchrun --nproc_per_node=8 train.py --data_path=... --depth=30 ...`.

Outputs in --local_out_dir_path (default local_output/): ar-ckpt-last.pth (full training state, written
atomically every --save_freq epochs, every --save_every_steps steps and at the end), ar-ckpt-best.pth (best
val loss), viar-slim.pth or var-slim.pth (model weights + config for gen_img.py / sampling.py), log.txt, tb-*/
(tensorboard).
A run started again in the same folder resumes from ar-ckpt-last.pth (also under torchrun --max-restarts).
"""
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import dist
from trainer import StepHooks, VARTrainer
from utils import cli
from utils.arch_flags import describe_model, describe_spec
from utils.atomic import check_writable
from utils.checkpoint import (CheckpointError, UnsafeCheckpointError, fetch_model, read_checkpoint,
                              save_atomic)
from utils.data import token_cache
from utils.data.datasets import HOLDOUT_FRACTION, UnreadableImageError, build_datasets, data_roots, unreadable_message
from utils.data.loader import available_cpus, loader_kwargs
from utils.data.sampler import DistInfiniteBatchSampler, EvalDistributedSampler
from utils.logging_util import ScalarWriter, format_duration, get_logger
from utils.memory import peak_memory
from utils.model_io import load_tokenizer, sample_defaults_in, save_slim, slim_export, tokenizer_ref
from utils.train import architecture, sharded_ckpt
from utils.train import args as arg_util
from utils.train.amp_opt import AmpOptimizer, build_adamw
from utils.train.args import Derived, TrainArgs
from utils.train.ema import ModelEMA
from utils.train.fsdp import fsdp_dtypes, measured_rank_bytes, rank_bytes
from utils.train.init_ckpt import apply_freeze, check_init_flags, initialise, read_weights
from utils.train.lr_control import apply_lr_wd, param_groups
from utils.train.policy import Pending, StepPolicy, default_log_every

# ---------------------------------------------------------------- seeds and RNG state

def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng() -> Dict[str, Any]:
    """This process's python/numpy/torch (and CUDA) RNG states, as plain data a weights-only load reads."""
    st = {'python': random.getstate(), 'numpy': numpy_rng_to_plain(np.random.get_state()),
          'torch': torch.get_rng_state()}
    if dist.get_device().type == 'cuda':
        st['cuda'] = torch.cuda.get_rng_state(dist.get_device())
    return st


def numpy_rng_to_plain(state: tuple) -> Dict[str, Any]:
    """np.random.get_state()'s tuple (name, uint32 key array, pos, has_gauss, cached_gaussian) as a plain dict."""
    name, key, pos, has_gauss, gauss = state
    return {'bit_generator': str(name), 'key': torch.from_numpy(np.asarray(key, dtype=np.int64)), 'pos': int(pos),
            'has_gauss': int(has_gauss), 'cached_gaussian': float(gauss)}


def numpy_rng_from_plain(st: Dict[str, Any]) -> tuple:
    """Inverse of numpy_rng_to_plain: the tuple np.random.set_state takes."""
    return (st['bit_generator'], st['key'].numpy().astype(np.uint32), st['pos'], st['has_gauss'],
            st['cached_gaussian'])


def restore_rng(st: Dict[str, Any]):
    """Inverse of capture_rng."""
    random.setstate(st['python'])
    np.random.set_state(numpy_rng_from_plain(st['numpy']))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and dist.get_device().type == 'cuda':
        torch.cuda.set_rng_state(st['cuda'], dist.get_device())


# ---------------------------------------------------------------- resume

def read_resume(path: str) -> Optional[Dict[str, Any]]:
    """The training checkpoint at path (read weights-only), None when there is none; an unreadable one is refused."""
    if not os.path.isfile(path):
        return None
    try:
        return read_checkpoint(path, mmap=True)   # mmap: ranks share pages
    except UnsafeCheckpointError as e:
        raise SystemExit(str(e)) from None
    except CheckpointError as e:
        raise SystemExit(f'cannot read {path} to resume: {e} Or move it away to start from scratch.') from None


def pick_resume(out: str, last_ckpt: str, prefer_sharded: bool, warn) -> Tuple[Optional[Dict[str, Any]], Any, str]:
    """(state, sharded, path) of the checkpoint to resume from: ar-ckpt-last.pth or the newest complete sharded
    folder (train.py --fsdp), whichever holds the later step (at equal steps, this run's own format). state is the
    .pth's dict, or a folder's plain part (its 'trainer' without tensors); sharded is (folder, DCP metadata) or None.
    Rank 0 picks (a refused folder is reported through warn, naming the file); every rank checks what it picked."""
    pth = read_resume(last_ckpt)
    newest = None
    if dist.is_master():
        found = sharded_ckpt.newest_complete(out, warn)
        newest = found[:2] if found is not None else None
    newest = dist.broadcast_object(newest)
    if newest is None or (pth is not None and (pth['g_it'] > newest[0] or
                                               (pth['g_it'] == newest[0] and not prefer_sharded))):
        return pth, None, last_ckpt if pth is not None else ''   # '': nothing to resume
    folder = newest[1]
    try:
        _, md = sharded_ckpt.check_folder(folder)
    except sharded_ckpt.IncompleteCheckpoint as e:
        raise SystemExit(f'rank {dist.get_rank()} cannot use {folder}: {e} (is the output folder shared by every '
                         f'node?)') from None
    return sharded_ckpt.read_state(folder), (folder, md), folder


def check_resumable(ckpt: Dict[str, Any], args: TrainArgs, path: str):
    """The checkpoint was trained with the same batch flags as this run (its architecture: architecture.resolve)."""
    old = arg_util.args_from_dict(ckpt.get('args', {})).flat()
    new = args.flat()
    diff = [f'--{k} {old[k]} (now {new[k]})' for k in ('bs', 'ac', 'seed', 'freeze') if old.get(k) != new.get(k)]
    if diff:
        raise SystemExit(f'{path} was trained with {", ".join(diff)}: run with the same flags to resume, '
                         f'or pass another --local_out_dir_path to start a new run.')


# ---------------------------------------------------------------- building

def remove_if_only_logs(folder: str):
    """Remove an output folder a failed start made, when nothing but its log is in it."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    if set(names) <= {'log.txt'}:
        for name in names:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def fetch_once_per_node(path: str):
    """Download an official file or a Hub repo missing locally on one rank per node while the others wait; a failure
    is reported by every rank when it reads the source."""
    if dist.is_local_master():
        try:
            fetch_model(path)
        except CheckpointError:
            pass
    dist.barrier()


def build_models(args: TrainArgs, der: Derived, spec, tokenizer, device: torch.device):
    """(frozen vae, var) built identically on every rank; the tokenizer's weights from its file, from the checkpoint
    that holds them, or random (architecture.Tokenizer)."""
    m = args.model
    seed_everything(args.run.seed)   # same init on every rank
    try:
        vae, var = spec.build(device, init_adaln=m.aln, init_adaln_gamma=m.alng, init_head=m.hd, init_std=m.ini,
                              cond_drop_rate=m.cond_drop, drop_path_rate=None if m.drop_path < 0 else m.drop_path,
                              jfb_no_grad=der.jfb_no_grad, jfb_with_grad=der.jfb_with_grad)
    except ValueError as e:
        raise SystemExit(f'cannot build the model: {e}') from None
    try:
        if tokenizer.path:
            fetch_once_per_node(tokenizer.path)
        load_tokenizer(vae, tokenizer)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    vae.eval().requires_grad_(False)
    return vae, var


def compile_for_training(var, backend: str = 'inductor'):
    """torch.compile, in place and with dynamic shapes, each of the model's `scale_loop_modules`; the loops chaining
    them stay eager (why: docs/TRAINING.md, "On a GPU")."""
    for m in var.scale_loop_modules():
        m.compile(backend=backend, dynamic=True)
    return var


def build_trainer(args: TrainArgs, der: Derived, vae, var, device: torch.device, hooks: Optional[StepHooks] = None,
                  log=None):
    """Wrap the transformer (FSDP2 with --fsdp on several ranks; compile; else DDP), make the optimizer, EMA and
    VARTrainer. The optimizer and EMA are made after sharding, so they hold shards too."""
    var.grad_ckpt = bool(args.optim.grad_ckpt)
    sharded = args.optim.fsdp and dist.initialized()
    if sharded:
        dist.fsdp_shard(var, var.fsdp_units(), *fsdp_dtypes(der.precision))
    elif args.optim.fsdp and log is not None:
        log.info('[fsdp] one process: nothing to shard, the model trains whole; checkpoints are still sharded '
                 'folders (ar-ckpt-step<N>/), which any number of ranks can resume')
    _, params, groups = param_groups(var, allow_frozen=bool(args.optim.freeze))   # --freeze: frozen ones left out
    opt = AmpOptimizer(build_adamw(groups, der.lr, device, fused=args.optim.afuse), params, der.precision,
                       args.optim.tclip, args.optim.ac, device.type)
    ema = ModelEMA(var, args.optim.ema) if args.optim.ema > 0 else None
    var_run = compile_for_training(var) if args.optim.compile else var
    if dist.initialized() and not sharded:
        var_run = DDP(var_run, device_ids=[device.index] if device.type == 'cuda' else None,
                      find_unused_parameters=False, broadcast_buffers=False)
    return VARTrainer(vae, var, var_run, opt, label_smooth=args.optim.ls, seed=args.run.seed, ema=ema,
                      jfb_draw=args.model.jfb_draw, hooks=hooks, drop_draw=args.model.drop_draw)


def build_loaders(args: TrainArgs, der: Derived, start_g_it: int, V: int, tokenizer):
    """(class names, train size, val size, train sampler, train loader, val loader): image folders, or with
    --token_cache the token maps of scripts/extract_tokens.py (same sampler and resume rules)."""
    seed, rank, world = args.run.seed, dist.get_rank(), dist.get_world_size()
    if args.data.token_cache:
        classes, train_set, val_set = token_cache.cache_datasets(args.data.token_cache, seed, der.patch_nums,
                                                                 der.final_reso, V, tokenizer)
        sampler_cls = token_cache.CacheBatchSampler
    else:
        classes, train_set, val_set = build_datasets(args.data.data_path, der.final_reso, der.mid_reso_px,
                                                     args.data.hflip)
        sampler_cls = DistInfiniteBatchSampler
    sampler = sampler_cls(len(train_set), der.glb_batch_size, rank, world, seed=seed)
    sampler.load_state_dict(sampler.position_at(start_g_it))
    kw = loader_kwargs(der.workers, pin=dist.get_device().type == 'cuda')
    # own generators: making an iterator must not draw from the global RNG (resume exactness, eval's cond-drop draws)
    ld_train = DataLoader(train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed * world + rank),
                          **kw)
    ld_val = DataLoader(val_set, batch_size=max(1, round(der.batch_size * 1.5)), **kw,
                        generator=torch.Generator().manual_seed(seed),
                        sampler=EvalDistributedSampler(len(val_set), rank, world))
    return classes, len(train_set), len(val_set), sampler, ld_train, ld_val


# ---------------------------------------------------------------- the run

@dataclass
class LoopState:
    """Mutable loop state that goes into the checkpoint."""
    g_it: int = 0                 # next forward pass
    best_val: float = math.inf
    nonfinite_run: int = 0        # consecutive skipped (non-finite) steps


class Run:
    """One training run: owns the trainer, loaders, loggers and checkpoints. hooks: see trainer.StepHooks."""

    def __init__(self, args: TrainArgs, argv: Sequence[str] = (), hooks: Optional[StepHooks] = None):
        self.args, self.hooks = args, hooks or StepHooks()
        self.device = dist.get_device()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        out = args.run.local_out_dir_path
        self.log = get_logger('train', None, dist.is_master(), timestamps=True)   # the file once the run is valid
        early: List[str] = []   # warnings before the log file exists: logged once it does (or when the run is refused)
        try:
            self._check(args, argv, out, early)
        except BaseException:
            for line in early:
                self.log.warning(line)
            raise
        # every flag, the architecture and the data are valid: the output folder can be made (a run refused before
        # this point leaves no folder behind, and one that fails while building removes the folder it made)
        created = not os.path.isdir(out)
        if dist.is_master():
            check_writable(out)
        dist.barrier()
        self.log = get_logger('train', out, dist.is_master(), timestamps=True)
        for line in early:
            self.log.warning(line)
        try:
            self._build(args, args.model, out)
        except BaseException:
            if created and dist.is_master():
                remove_if_only_logs(out)
            raise

    def _check(self, args: TrainArgs, argv: Sequence[str], out: str, early: List[str]):
        """What can refuse the run before anything is written: the checkpoint it resumes, the file it starts from,
        the architecture and tokenizer, the derived values and the data."""
        self.ckpt, self.ckpt_sharded, self.ckpt_path = pick_resume(out, os.path.join(out, 'ar-ckpt-last.pth'),
                                                                   args.optim.fsdp, early.append)
        m = args.model
        given = arg_util.given_fields(args.arch)
        check_init_flags(m.init_ckpt, m.init_from_var, given.get('use_implicit', bool(m.init_from_var)))
        init, init_path = None, m.init_ckpt or m.init_from_var
        if self.ckpt is None and init_path:
            fetch_once_per_node(init_path)
            init = (init_path, *read_weights(init_path))   # (path, contents, transformer state dict)
        default_tok = architecture.DEFAULT_VAE_CKPT
        if args.data.token_cache:   # a new run on a token cache: the tokenizer it was made with
            default_tok = token_cache.read_manifest(args.data.token_cache)['tokenizer'].get('path') or default_tok
        self.arch = architecture.resolve(given, m.vae_ckpt, args.data.patch_size, argv, init=init,
                                         from_var=bool(m.init_from_var),
                                         resume=(self.ckpt_path, self.ckpt) if self.ckpt is not None else None,
                                         default_vae_ckpt=default_tok)
        self.der = arg_util.derive(args, self.world, available_cpus(), dist.get_local_world_size(), self.arch.spec)
        if self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.optim.tf32)
        if self.ckpt is not None:
            check_resumable(self.ckpt, args, self.ckpt_path)
        self.loop = LoopState(self.ckpt['g_it'], self.ckpt.get('best_val', math.inf), self.ckpt.get('nonfinite', 0)) \
            if self.ckpt is not None else LoopState()
        # what the exports record for the sampling tools: --sample_defaults, else the record of the checkpoint this
        # run resumes or of the file it starts from
        start = (self.ckpt_path, self.ckpt) if self.ckpt is not None else init[:2] if init else None
        try:
            self.sample_defaults = self.der.sample_defaults or (sample_defaults_in(start[1], start[0]) if start else
                                                                None) or {}
        except CheckpointError as e:
            raise SystemExit(f'error: {e}; or give --sample_defaults') from None

        (self.class_names, self.n_train, self.n_val, self.sampler, self.ld_train,
         self.ld_val) = build_loaders(args, self.der, self.loop.g_it, self.arch.spec.V, self.arch.tokenizer)
        self.spec = self.with_classes(self.arch.spec, len(self.class_names), given)

    def _build(self, args: TrainArgs, m, out: str):
        """Everything after the checks: the schedule, the models and their weights, the trainer, the loggers."""
        self.iters_ep = len(self.sampler)
        self.total = arg_util.total_forwards(args, self.iters_ep)
        # warmup/progressive lengths are given in epochs; with --max_steps they scale with the shortened run
        frac = self.total / (args.sched.ep * self.iters_ep)
        self.prog_wp_it = self.der.pgwp_ep * self.iters_ep * frac
        s, r = args.sched, args.run
        self.policy = StepPolicy(
            total=self.total, iters_ep=self.iters_ep, ac=args.optim.ac, peak_lr=self.der.lr, wd=self.der.wd,
            wd_end=self.der.wd_end, sche=self.der.sche, wp_it=self.der.wp_ep * self.iters_ep * frac, wp0=s.wp0,
            wpe=s.wpe, pg=s.pg, pg0=s.pg0, num_scales=len(self.der.patch_nums), save_freq=r.save_freq,
            save_every_steps=r.save_every_steps, val_every=r.val_every,
            log_every=r.log_every or default_log_every(self.iters_ep))

        tok = self.arch.tokenizer
        self.log.info(f'[model] {describe_spec(self.spec)}, set by {self.arch.source}; tokenizer: {tok.describe()}')
        if self.sample_defaults:
            self.log.info('[export] sampling defaults recorded for gen_img.py / sampling.py / app.py: '
                          + ', '.join(f'{k} {v:g}' for k, v in self.sample_defaults.items()))
        if tok.random:
            self.log.warning('the tokenizer has RANDOM weights (--vae_ckpt random): fine for tests, useless for real '
                             'images. Its weights go into the checkpoints.')
        # the slim export carries its tokenizer: an official file by name and sha256, any other embedded
        self.vae_ref = tokenizer_ref(tok.path) if tok.path else None
        self.vae, self.var = build_models(args, self.der, self.spec, tok, self.device)
        if self.ckpt is None:   # weights only; a resume always wins (a killed fine-tune continues where it was)
            initialise(self.var, self.spec, self.arch.init_sd, self.arch.source, bool(m.init_from_var), self.log.info)
        elif m.init_ckpt or m.init_from_var:
            self.log.info(f'[init] resuming from {self.ckpt_path}: --init_ckpt/--init_from_var not applied')
        apply_freeze(self.var, args.optim.freeze, self.log.info)
        self.trainer = build_trainer(args, self.der, self.vae, self.var, self.device, self.hooks, self.log)
        if self.trainer.sharded:
            self._log_shard_bytes()
        seed_everything(args.run.seed * self.world + self.rank)
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.ckpt = self.ckpt_sharded = None   # free the memory
        self.tb = ScalarWriter(self.der.tb_dir if dist.is_master() else None)
        self.step_log = open(os.path.join(out, f'steps-rank{self.rank}.jsonl'), 'a') if args.run.step_log else None

    def with_classes(self, spec, data_classes: int, given: Dict[str, Any]):
        """The spec with its class count: the data's (a new run, a fine-tune), unless --num_classes is given; a
        resume keeps its own. Fewer classes than the data has folders is refused."""
        n = spec.num_classes if (self.ckpt is not None or 'num_classes' in given) else data_classes
        if n < data_classes:
            where = self.ckpt_path if self.ckpt is not None else 'num_classes'
            raise SystemExit(f'{where}: the model has {n} classes, fewer than the {data_classes} class folders in '
                             f'{self.args.data.data_path}/train.')
        return replace(spec, num_classes=n)

    def _restore(self, ck: Dict[str, Any]):
        if self.ckpt_sharded is not None:
            self._restore_sharded(ck)
        else:   # a DDP checkpoint: under --fsdp each rank keeps its shards of it
            self.trainer.load_state_dict(ck['trainer'])   # the tokenizer: build_models
        rngs: List[Dict] = ck.get('rng', [])
        if len(rngs) == self.world:
            restore_rng(rngs[self.rank])
        else:
            m = self.args.model
            if m.jfb_draw == 'step' and m.drop_draw == 'step':
                self.log.info(f'resuming on {self.world} ranks a run saved on {len(rngs)}: the data order, S-JFB, '
                              f'class dropout and drop path are keyed by (seed, step), so training continues as it '
                              f'would have; the per-rank generators are reseeded.')
            else:
                self.log.warning(f'resuming on {self.world} ranks a run saved on {len(rngs)}: the data order and '
                                 f'the draws keyed by (seed, step) are kept, the per-rank draws (--jfb_draw/--drop_draw '
                                 f'rank) are reseeded, so training continues differently.')
            seed_everything(self.args.run.seed * self.world + self.rank + 7919 * self.loop.g_it)
        ep, it = divmod(self.loop.g_it, self.iters_ep)
        self.log.info(f'[resume] {self.ckpt_path}: step {self.loop.g_it} (ep {ep}, it {it}), '
                      f'best val loss {self.loop.best_val:.4f}')

    def _restore_sharded(self, ck: Dict[str, Any]):
        """Fill the model, AdamW state and EMA from a sharded folder (resharded to this world size; a plain model
        when this run does not shard), then the plain rest."""
        folder, md = self.ckpt_sharded
        tensors, _ = self.trainer.sharded_state_dict()
        if 'ema' in tensors and not any(k.startswith('ema.') for k in md.state_dict_metadata):
            self.log.info(f'[resume] {folder} holds no EMA: it starts from the current weights')
            del tensors['ema']
        try:
            dist.dcp_load(tensors, folder, md)
        except Exception as e:   # DCP reports a key or shape the folder lacks as a generic error: name the folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f'cannot resume from {folder}: {first[:300]}. Was it written by a run with other '
                             f'model flags? Move it away to start from an earlier checkpoint.') from None
        self.trainer.load_sharded_state_dict(tensors, ck['trainer'])

    def _log_shard_bytes(self):
        """Parameter + gradient + AdamW bytes this rank holds, read off its shards beside the arithmetic."""
        params = [p for p in self.var.parameters() if p.requires_grad]
        got = measured_rank_bytes(params, lambda p: dist.local_part(p).numel())
        want = rank_bytes([tuple(p.shape) for p in params], self.world)
        self.log.info(f'[fsdp] {len(self.var.fsdp_units())} units + the root over {self.world} ranks; rank 0 holds '
                      f'params {got.params} B, grads {got.grads} B, AdamW {got.optim} B (arithmetic: {want.params}, '
                      f'{want.grads}, {want.optim})')

    # ---- checkpoints
    def _save(self, best: bool):
        """ar-ckpt-last.pth (+ best), or with --fsdp a sharded folder, and the slim export; never non-finite weights."""
        if not self.trainer.weights_finite():
            last = (self.ckpt_path or 'none yet') if self.args.optim.fsdp else self.der.last_ckpt
            raise SystemExit(f'the model weights became non-finite by step {self.loop.g_it}; not saving them. '
                             f'The last good checkpoint is {last}; lower --tblr or --tclip and resume.')
        rngs = dist.all_gather_object(capture_rng())
        ep, it = divmod(self.loop.g_it, self.iters_ep)
        tok = self.arch.tokenizer   # a file is recorded by name; other weights go into 'trainer' (with_vae)
        state = {'epoch': ep, 'iter': it, 'g_it': self.loop.g_it, 'version': 1,
                 'sampler': self.sampler.position_at(self.loop.g_it),
                 'args': self.args.to_dict(), 'config': self.spec.to_dict(),
                 'tokenizer': dict(path=tok.path, random=tok.random, where=tok.where),
                 'class_names': list(self.class_names), 'sampling': self.sample_defaults, 'world_size': self.world,
                 'rng': rngs, 'best_val': self.loop.best_val, 'nonfinite': self.loop.nonfinite_run}
        if self.args.optim.fsdp:   # every rank writes its shards; rank 0 the plain rest and the marker
            tensors, plain = self.trainer.sharded_state_dict(with_vae=not tok.path)
            self.ckpt_path = sharded_ckpt.save(self.args.run.local_out_dir_path, self.loop.g_it, tensors,
                                               dict(state, trainer=plain), best, self.log.info)
            saved = self.ckpt_path + (' (best)' if best else '')
        else:
            if dist.is_master():
                state['trainer'] = self.trainer.state_dict(with_vae=not tok.path)
                save_atomic(state, self.der.last_ckpt)
                if best:
                    save_atomic(state, self.der.best_ckpt)
            saved = self.der.last_ckpt + (' (+ best)' if best else '')
        self._save_slim()
        self.log.info(f'[ckpt] after step {self.loop.g_it}: {saved}')

    def _save_slim(self):
        """viar-slim.pth / var-slim.pth and .safetensors for gen_img.py / sampling.py, written by rank 0; a sharded
        model is gathered into one ordinary state dict first (every rank takes part)."""
        ema_sd = self.trainer.ema.model_state_dict(self.var) if self.trainer.ema is not None else None
        model_sd = None
        if self.trainer.sharded:
            model_sd = dist.gather_full(self.var.state_dict())
            ema_sd = dist.gather_full(ema_sd) if ema_sd is not None else None
        if dist.is_master():
            save_slim(slim_export(self.var, self.spec, vae=self.vae if self.vae_ref is None else None,
                                  var_ema_sd=ema_sd, vae_ref=self.vae_ref, model_sd=model_sd,
                                  class_names=self.class_names, sample_defaults=self.sample_defaults),
                       self.der.slim_path)
        dist.barrier()

    def _validate(self) -> bool:
        """Val loss/acc; returns whether it is the best so far."""
        t0 = time.time()
        v = self.trainer.evaluate(self.ld_val, seed=self.args.run.seed)
        best = v['L_mean'] < self.loop.best_val
        if best:
            self.loop.best_val = v['L_mean']
        self.log.info(f'[val] after step {self.loop.g_it} ({v["count"]} images, {time.time() - t0:.1f}s): '
                      f'Lm {v["L_mean"]:.4f} Lt {v["L_tail"]:.4f} Acc m&t {v["acc_mean"]:.2f} {v["acc_tail"]:.2f}'
                      + (' (best)' if best else ''))
        self.tb.add('AR_val', {k: v[k] for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail')}, self.loop.g_it)
        return best

    # ---- the loop
    def _next_batch(self, it):
        """The next batch; an image that cannot be decoded stops the run with its one line."""
        try:
            return next(it)
        except (UnreadableImageError, RuntimeError) as e:
            msg = unreadable_message(e)
            if msg is None:
                raise
            raise SystemExit(msg) from None

    def train(self):
        """Run from self.loop.g_it to the end: the step policy is self.policy (pure), this loop only carries it out."""
        a, der = self.args, self.der
        held = not a.data.token_cache and data_roots(a.data.data_path)[1] is None
        note = f' (no val/ folder: {HOLDOUT_FRACTION:.0%} of each class held out of training)' if held else ''
        self.log.info(f'[data] train {self.n_train} / val {self.n_val} images{note}, {len(self.class_names)} classes, '
                      f'{self.iters_ep} iters per epoch; global batch {der.glb_batch_size} x ac {a.optim.ac}, '
                      f'{der.batch_size} per rank on {self.world} rank(s); {der.workers} loader worker(s) per rank '
                      f'({der.workers_rule})')
        n_params = sum(p.numel() for p in self.var.parameters())
        self.log.info(f'[model] {describe_model(self.var)}: {n_params / 1e6:.2f}M params; {der.lr_rule}, '
                      f'{der.precision}')
        self.log.info('[args]\n' + arg_util.format_args(a))
        if self.loop.g_it >= self.total:
            self.log.info(f'[done] nothing to do: step {self.loop.g_it} >= {self.total}')
        self.var.train()
        it_train = iter(self.ld_train)
        pending = Pending()
        t_start, g_start = time.time(), self.loop.g_it
        while self.loop.g_it < self.total:
            g_it = self.loop.g_it
            img, label = self._next_batch(it_train)
            img, label = img.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True)
            sch = self.policy.schedule_at(g_it)
            apply_lr_wd(self.trainer.opt.optimizer, sch.lr, sch.wd)
            st = self.trainer.train_step(img, label, g_it, sch.stepping, sch.prog_si, self.prog_wp_it)
            self.loop.g_it = done = g_it + 1   # steps are numbered from 1 in logs and hooks
            if self.step_log is not None:
                self.step_log.write(json.dumps(dict(step=done, loss=st.loss, n=st.n, m=st.m, lr=sch.lr,
                                                    finite=st.loss_finite, stepped=st.stepped)) + '\n')
                self.step_log.flush()
            self._count_nonfinite(st, done, sch.stepping)
            events, pending = self.policy.events_at(done, pending, first=g_it == g_start)
            if events.log:
                self._report(st, g_it, sch.lr, sch.wd, t_start, g_start)
            best = self._validate() if events.validate else False
            if events.save or best:
                self._save(best)
            self.hooks.after_step(done)
        self.log.info(f'[done] {self.total} steps in {format_duration(time.time() - t_start)}; '
                      f'best val loss {self.loop.best_val:.4f}; outputs in {a.run.local_out_dir_path}')

    def _count_nonfinite(self, st, done: int, stepping: bool):
        """The non-finite policy: a skipped step is counted; too many in a row stop the run with the fix."""
        o = self.args.optim
        bad = not st.loss_finite or (stepping and not st.stepped and self.der.precision != 'fp16')
        if not bad:
            if st.stepped:
                self.loop.nonfinite_run = 0
            return
        self.loop.nonfinite_run += 1
        self.log.warning(f'[skip] step {done}: non-finite {"loss" if not st.loss_finite else "gradient"}, '
                         f'no update ({self.loop.nonfinite_run} in a row)')
        if self.loop.nonfinite_run >= o.max_nonfinite:
            raise SystemExit(f'stopped at step {done}: {self.loop.nonfinite_run} non-finite losses/gradients '
                             f'in a row (--max_nonfinite {o.max_nonfinite}). The last good checkpoint is '
                             f'{self.der.last_ckpt}; lower --tblr, try --bf16 or --fp16 0, or check the data.')

    def _report(self, st, g_it: int, lr: float, wd: float, t_start: float, g_start: int):
        """Progress line (rank 0) and tensorboard scalars."""
        done = g_it + 1 - g_start
        dt = max(time.time() - t_start, 1e-9)
        sec_per_it = dt / done
        eta = sec_per_it * (self.total - g_it - 1)
        imgs = self.der.glb_batch_size * done / dt
        mem = peak_memory(self.device)['bytes'] / 2 ** 20
        ep, it = divmod(g_it, self.iters_ep)
        sjfb = dict(n=st.n, m=st.m) if st.n is not None else {}
        jfb = f' n/m {st.n}/{st.m}' if sjfb else ''
        gn = f'{st.grad_norm:.3f}' if st.grad_norm is not None else '-'
        self.log.info(f'[ep {ep + 1}/{self.args.sched.ep} it {it + 1}/{self.iters_ep}] step {g_it + 1}/{self.total} '
                      f'loss {st.loss:.4f} Lm {st.L_mean:.4f} Lt {st.L_tail:.4f} acc m&t {st.acc_mean:.2f} '
                      f'{st.acc_tail:.2f} lr {lr:.3g} wd {wd:.3g} gnorm {gn}{jfb} | {imgs:.1f} img/s '
                      f'{sec_per_it:.3f}s/it mem {mem:.0f}MiB ETA {format_duration(eta)}')
        self.tb.add('AR_iter_loss', dict(loss=st.loss, L_mean=st.L_mean, L_tail=st.L_tail if st.L_tail >= 0 else None,
                                         acc_mean=st.acc_mean, acc_tail=st.acc_tail if st.acc_tail >= 0 else None),
                    g_it)
        self.tb.add('AR_iter_scale_loss', {f'L_{self.der.resos[si]}': v for si, v in enumerate(st.scale_loss)}, g_it)
        self.tb.add('AR_opt', dict(lr=lr, wd=wd, grad_norm=st.grad_norm, scale_log2=st.scale_log2), g_it)
        self.tb.add('AR_sjfb', sjfb, g_it)
        self.tb.add('AR_speed', dict(images_per_s=imgs, sec_per_it=sec_per_it, peak_mem_mib=mem), g_it)
        self.tb.flush()

    def close(self):
        """Flush and close the loggers."""
        self.tb.close()
        if self.step_log is not None:
            self.step_log.close()
            self.step_log = None


@cli.exits_on_write_error
def main(argv: Optional[List[str]] = None, hooks: Optional[StepHooks] = None):
    """Parse flags, join the process group, train (hooks: see trainer.StepHooks)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = arg_util.parse_args(argv)
    if args.data.data_path in ('', arg_util.PLACEHOLDER_DATA_PATH) and not args.data.token_cache:
        raise SystemExit('please pass --data_path=/path/to/imagenet (a folder with train/ and val/ class folders).')
    dist.initialize(args.run.device)
    run = None
    try:
        run = Run(args, argv, hooks)
        try:
            run.train()
        finally:
            run.close()
    finally:
        # the model, optimizer and (under --fsdp) its device mesh hold the process group: free them first, so the
        # group's gloo threads are not torn down at interpreter exit, which aborted a finished FSDP rank now and then
        run = None
        gc.collect()
        dist.finalize()


if __name__ == '__main__':
    main(sys.argv[1:])
