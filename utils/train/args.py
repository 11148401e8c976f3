"""Training configuration: typed dataclasses, the argparse CLI generated from them, and derived values.

Official flags keep their names and meanings; values computed from the flags (per-GPU batch, peak lr,
resolution, warmup length, ...) come from the one pure function `derive`.
"""
import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from models.config import ModelSpec
from utils import cli
from utils.arch_flags import ArchFlags, add_arch_args, check_spec, given_fields
from utils.cli import flag
from utils.data.loader import available_cpus, resolve_workers
from utils.sample.compile_util import SamplingError
from utils.sample.config import RECORDED, recorded_defaults
from utils.train.fsdp import fsdp_dtypes
from utils.train.init_ckpt import check_init_flags

PLACEHOLDER_DATA_PATH = '/path/to/imagenet'


@dataclass
class DataArgs:
    """Where the images are and how they are augmented."""
    data_path: str = flag(PLACEHOLDER_DATA_PATH, 'ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG')
    patch_size: Optional[int] = flag(None, 'pixels per token at the last scale: the tokenizer downsampling, '
                                           '2^(len(vae_ch_mult) - 1); given, it must be that')
    mid_reso: float = flag(1.125, 'resize the shorter side to mid_reso * final resolution, then crop')
    hflip: bool = flag(False, 'random horizontal flip on train images')
    workers: str = flag('auto', "DataLoader worker processes per rank: 'auto' = min(8, CPUs // ranks on this node), "
                                "persistent and prefetching; 0 = load in the training process (official)")
    token_cache: str = flag('', 'train on the token maps scripts/extract_tokens.py wrote to this folder instead of '
                                'images (no VQVAE encoder; --data_path not needed; crops/flips as stored)')


@dataclass
class ModelArgs:
    """How the transformer is initialised and trained, and the frozen tokenizer (its architecture: ArchFlags)."""
    ini: float = flag(-1.0, 'init std of Linear/Embedding weights (-1: sqrt(1/(3*width)))')
    hd: float = flag(0.02, 'head weight multiplier at init')
    aln: float = flag(0.5, 'multiplier of the AdaLN linear init')
    alng: float = flag(1e-5, 'multiplier of the AdaLN gamma channels at init')
    drop_path: float = flag(-1.0, 'max drop-path rate (-1: official 0.1*depth/24)')
    cond_drop: float = flag(0.1, 'probability of replacing the class by the null class (for CFG)')
    jfb_n: Tuple[int, ...] = flag((0, 10), 'S-JFB: range of iterations without grad, e.g. 0_10 (inclusive)')
    jfb_m: Tuple[int, ...] = flag((1, 12), 'S-JFB: range of iterations with grad, e.g. 1_12 (inclusive)')
    jfb_draw: str = flag('step', "S-JFB draw: 'step' = the same (n, m) on every rank, from (seed, step), so a resume "
                                 "at any world size draws the same; 'rank' = the official per-rank draw from "
                                 "Python's global random (seeded seed*world+rank)", choices=('step', 'rank'))
    drop_draw: str = flag('step', "class dropout and drop path: 'step' = drawn for the whole global batch from "
                                  "(seed, step), each rank taking its rows, so any world size trains the same run; "
                                  "'rank' = the official per-rank draws from the global torch generator (seeded "
                                  "seed*world+rank)", choices=('step', 'rank'))
    vae_ckpt: Optional[str] = flag(None, "tokenizer: a file (the official vae_ch160v4096z32.pth, or a "
                                         "train_tokenizer.py vae.pth), or 'random' (random weights: tests only); "
                                         "default: the one --init_ckpt / --init_from_var / the resumed checkpoint "
                                         "comes with, else the official ckpts/vae_ch160v4096z32.pth")
    init_ckpt: str = flag('', 'start from these weights (official name, ar-ckpt-*.pth, a *-slim.pth export, a Hub '
                              'folder or repo id): weights only; another class count re-initialises the class rows, keeping the null-class '
                              'row; ar-ckpt-last.pth in the output folder (a resume) wins')
    init_from_var: str = flag('', 'VIAR only: start from a VAR file (pre-blocks = its first p blocks, post-blocks = '
                                  'its last p, implicit block = its block depth//2, embeddings/AdaLN/head)')


@dataclass
class OptimArgs:
    """Optimizer, precision and batch."""
    bs: int = flag(768, 'global batch size per optimizer step (split over ranks and --ac)')
    ac: int = flag(1, 'gradient accumulation steps')
    tblr: float = flag(1e-4, 'base lr; peak lr = tblr * bs / 256 unless --tlr')
    tlr: Optional[float] = flag(None, 'peak lr (overrides tblr * bs / 256)')
    twd: float = flag(0.05, 'initial weight decay')
    twde: float = flag(0.0, 'final weight decay (0: same as --twd)')
    tclip: float = flag(2.0, 'gradient-norm clip (<= 0: off)')
    ls: float = flag(0.0, 'label smoothing of the training cross-entropy')
    opt: str = flag('adamw', 'optimizer', choices=('adam', 'adamw'))
    afuse: bool = flag(True, 'fused AdamW where the device supports it')
    fp16: int = flag(0, 'mixed precision: 0 fp32, 1 fp16 (GradScaler), 2 bf16', choices=(0, 1, 2))
    bf16: bool = flag(False, 'same as --fp16 2')
    ema: float = flag(0.0, 'EMA decay of the weights (0: off), e.g. 0.9999')
    grad_ckpt: bool = flag(False, 'activation checkpointing of every block (less memory, ~30%% more compute)')
    compile: bool = flag(False, 'torch.compile the transformer')
    fsdp: bool = flag(False, 'shard parameters, gradients and AdamW state over the ranks (FSDP2: fully_shard per '
                             'block and on the root) instead of DDP; checkpoints become sharded folders '
                             'ar-ckpt-step<N>/ that any world size resumes; with --bf16 (bf16 compute copies, fp32 '
                             'gradient reduction); --fp16 1 is refused')
    tf32: bool = flag(True, 'TF32 matmuls on Ampere+ GPUs')
    max_nonfinite: int = flag(20, 'stop after this many non-finite losses in a row (each such step is skipped)')
    freeze: str = flag('', "parameters not to train: comma-separated fnmatch patterns over parameter names, in order; "
                           "'!pattern' unfreezes (e.g. '*,!implicit_block.*,!class_emb.*')")


@dataclass
class ScheduleArgs:
    """Length of training, lr/wd schedule and progressive training."""
    ep: int = flag(250, 'epochs')
    wp: float = flag(0.0, 'warmup epochs (0: ep/50)')
    wp0: float = flag(0.005, 'lr ratio at the start of warmup')
    wpe: float = flag(0.01, 'lr ratio at the end of training')
    sche: str = flag('lin0', 'lr schedule after warmup: lin0, lin, lin00, lin<T>, cos, exp')
    pg: float = flag(0.0, 'progressive training over the first pg fraction of steps (0: off)')
    pg0: int = flag(4, 'progressive training: first scale index trained')
    pgwp: float = flag(0.0, 'progressive training: warmup epochs per stage (0: ep/300)')
    max_steps: int = flag(0, 'stop after this many optimizer steps; the schedule spans them (0: ep epochs)')


@dataclass
class RunArgs:
    """Outputs, logging, checkpoints and seeds."""
    exp_name: str = flag('text', 'experiment name (logged)')
    local_out_dir_path: str = flag('local_output', 'output folder: checkpoints, log.txt, tensorboard')
    seed: int = flag(0, 'seed; rank r uses seed*world+r for torch/numpy/python; S-JFB, class dropout and drop path '
                        'use (seed, step) unless --jfb_draw/--drop_draw rank')
    device: str = flag('auto', 'auto, cuda or cpu')
    save_freq: int = flag(5, 'validate and save ar-ckpt-last.pth every this many epochs (and at the end)')
    save_every_steps: int = flag(0, 'also save ar-ckpt-last.pth every this many steps (0: off)')
    val_every: int = flag(0, 'also validate every this many steps (0: only when saving per epoch)')
    log_every: int = flag(0, 'progress line every this many steps (0: ~20 per epoch)')
    step_log: bool = flag(False, 'every rank appends one JSON line per step (loss, n, m, lr) to steps-rank<r>.jsonl')
    sample_defaults: str = flag('', "sampling defaults recorded in the exports, which gen_img.py, sampling.py and "
                                    "app.py then use for flags not typed, e.g. cfg=0,top_k=0,top_p=0,iter_left=4,"
                                    "iter_right=4 (names: " + ', '.join(RECORDED) + "; default: none recorded, the "
                                    "tools use the ImageNet settings)")


GROUPS = (('arch', ArchFlags), ('data', DataArgs), ('model', ModelArgs), ('optim', OptimArgs),
          ('sched', ScheduleArgs), ('run', RunArgs))


@dataclass
class TrainArgs:
    """All training flags, grouped."""
    arch: ArchFlags = field(default_factory=ArchFlags)
    data: DataArgs = field(default_factory=DataArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    sched: ScheduleArgs = field(default_factory=ScheduleArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def to_dict(self) -> Dict[str, Dict]:
        """Plain nested dict (stored in checkpoints)."""
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, object]:
        """flag name -> value over all groups."""
        return {k: v for g in self.to_dict().values() for k, v in g.items()}


@dataclass(frozen=True)
class Derived:
    """Values computed from the flags and the world size."""
    batch_size: int            # per rank per forward
    glb_batch_size: int        # per forward over all ranks (= bs / ac)
    lr: float                  # peak lr
    lr_rule: str               # how it was reached, for the log
    wd: float
    wd_end: float
    wp_ep: float               # warmup epochs
    pgwp_ep: float             # progressive warmup epochs per stage
    sche: str
    patch_nums: Tuple[int, ...]
    resos: Tuple[int, ...]
    final_reso: int
    mid_reso_px: int
    precision: str             # 'fp32', 'fp16' or 'bf16'
    workers: int               # loader processes per rank
    workers_rule: str          # how that number was reached (logged)
    jfb_no_grad: Tuple[int, int]
    jfb_with_grad: Tuple[int, int]
    tb_dir: str
    last_ckpt: str
    best_ckpt: str
    slim_path: str
    sample_defaults: Dict[str, object]   # --sample_defaults, checked


def _parse_range(name: str, value: Sequence[int], lo: int) -> Tuple[int, int]:
    if len(value) != 2 or value[0] > value[1] or value[0] < lo:
        raise SystemExit(f'--{name} must be two integers a_b with {lo} <= a <= b (e.g. {lo}_10); got {value}')
    return int(value[0]), int(value[1])


def derive(args: TrainArgs, world_size: int, cpus: Optional[int] = None, ranks_per_node: Optional[int] = None,
           spec=None) -> Derived:
    """Every value that follows from the flags and the architecture; bad combinations are a SystemExit with the fix.
    spec: the run's ModelSpec (None: the architecture flags alone); cpus, ranks_per_node: for --workers auto (None:
    this process's CPUs, all ranks on one node)."""
    d, m, o, s, r = args.data, args.model, args.optim, args.sched, args.run
    if spec is None:
        spec = ModelSpec(**given_fields(args.arch))
    if o.ac < 1 or o.bs < 1:
        raise SystemExit(f'--bs and --ac must be positive (got --bs {o.bs} --ac {o.ac})')
    split = o.ac * world_size
    if o.bs % split != 0:
        raise SystemExit(f'--bs {o.bs} cannot be split over {world_size} rank(s) x {o.ac} accumulation step(s): '
                         f'use a multiple of {split}.')
    batch_size = o.bs // split
    patch_nums = tuple(spec.patch_nums)
    if d.patch_size is not None and d.patch_size != spec.downsample:
        raise SystemExit(f'--patch_size {d.patch_size} must equal the tokenizer downsampling 2^(len(vae_ch_mult)-1) '
                         f'= {spec.downsample} (--vae_ch_mult {"_".join(map(str, spec.vae_ch_mult))}).')
    resos = tuple(p * spec.downsample for p in patch_nums)
    final_reso = max(resos)
    check_init_flags(m.init_ckpt, m.init_from_var, spec.use_implicit)
    if o.bf16 and o.fp16 == 1:
        raise SystemExit('--fp16 1 (fp16) and --bf16 both given: pick one (--bf16 is the same as --fp16 2).')
    precision = 'bf16' if (o.bf16 or o.fp16 == 2) else ('fp16' if o.fp16 == 1 else 'fp32')
    if o.fsdp:
        fsdp_dtypes(precision)   # fp16 is refused with the fix
    try:
        check_spec(spec)
    except ValueError as e:
        raise SystemExit(f'cannot build the model: {e}') from None
    sche = f'lin{s.pg:g}' if s.pg > 0 else s.sche
    workers, workers_rule = resolve_workers(d.workers, available_cpus() if cpus is None else cpus,
                                            world_size if ranks_per_node is None else ranks_per_node, batch_size)
    pn = '_'.join(map(str, patch_nums))
    tb_name = re.sub(r'[^\w\-+,.]', '_', f'tb-VARd{spec.depth}__pn{pn}__b{o.bs}ep{s.ep}{o.opt[:4]}lr{o.tblr:g}wd{o.twd:g}')
    out = r.local_out_dir_path
    lr, lr_rule = peak_lr(o.tblr, o.tlr, o.bs)
    try:
        sample_defaults = recorded_defaults(r.sample_defaults) if r.sample_defaults else {}
    except SamplingError as e:
        raise SystemExit(str(e)) from None
    return Derived(
        batch_size=batch_size, glb_batch_size=batch_size * world_size, lr=lr, lr_rule=lr_rule,
        wd=o.twd, wd_end=o.twde or o.twd,
        wp_ep=s.wp or s.ep / 50, pgwp_ep=s.pgwp or s.ep / 300, sche=sche,
        patch_nums=patch_nums, resos=resos, final_reso=final_reso, mid_reso_px=round(d.mid_reso * final_reso),
        precision=precision, workers=workers, workers_rule=workers_rule,
        jfb_no_grad=_parse_range('jfb_n', m.jfb_n, 0), jfb_with_grad=_parse_range('jfb_m', m.jfb_m, 1),
        tb_dir=os.path.join(out, tb_name),
        last_ckpt=os.path.join(out, 'ar-ckpt-last.pth'), best_ckpt=os.path.join(out, 'ar-ckpt-best.pth'),
        # viar-slim.pth or var-slim.pth: the two kinds never share a name (gen_img.py names its output folder after it)
        slim_path=os.path.join(out, f'{spec.kind.lower()}-slim.pth'), sample_defaults=sample_defaults,
    )


def peak_lr(tblr: float, tlr: Optional[float], bs: int) -> Tuple[float, str]:
    """(peak lr, how it was reached): --tlr when given, else the official tblr * bs / 256."""
    if tlr is not None:
        return tlr, f'peak lr {tlr:.3g} = --tlr'
    lr = tblr * bs / 256
    return lr, f'peak lr {lr:.3g} = tblr {tblr:g} x bs {bs} / 256'


def total_forwards(args: TrainArgs, iters_ep: int) -> int:
    """Forward passes of the whole run: ep epochs, or --max_steps optimizer steps when given."""
    full = args.sched.ep * iters_ep
    return min(full, args.sched.max_steps * args.optim.ac) if args.sched.max_steps > 0 else full


# ---------------------------------------------------------------- CLI generated from the dataclasses

def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one flag per dataclass field, grouped as the dataclasses are (utils.cli)."""
    parser = argparse.ArgumentParser(description='Train VAR / VIAR (torchrun for several GPUs).',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group_name, clz in GROUPS:
        if clz is ArchFlags:
            add_arch_args(parser)
        else:
            cli.add_dataclass_args(parser, clz, group_name)
    parser.add_argument('--jfb', type=int, nargs=4, metavar=('N0', 'N1', 'M0', 'M1'), default=None,
                        help='shorthand for --jfb_n N0_N1 --jfb_m M0_M1')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead
    parser.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> TrainArgs:
    """TrainArgs from the command line (argv=None: sys.argv)."""
    ns = build_parser().parse_args(argv)
    if ns.jfb is not None:
        ns.jfb_n, ns.jfb_m = tuple(ns.jfb[:2]), tuple(ns.jfb[2:])
    return TrainArgs(**{name: cli.from_namespace(clz, ns) for name, clz in GROUPS})


def args_from_dict(d: Dict[str, Dict]) -> TrainArgs:
    """Inverse of TrainArgs.to_dict (unknown keys from other versions are dropped)."""
    return TrainArgs(**{name: cli.from_dict(clz, d.get(name, {})) for name, clz in GROUPS})


def format_args(args: TrainArgs) -> str:
    """One 'name: value' line per flag, for the log."""
    return '\n'.join(f'  {k:20s}: {v}' for k, v in args.flat().items())
