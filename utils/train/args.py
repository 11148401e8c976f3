"""Training configuration: typed dataclasses, the argparse CLI generated from them, and derived values.

Every official flag keeps its name and meaning (`--depth --bs --ep --tblr --fp16 --alng --wpe --twde
--use_implicit --p_depth ...`). Values computed from the flags (per-GPU batch, peak lr, resolution,
warmup length, ...) come from the one pure function `derive(args, world_size)`.
"""
import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from utils.sample.args import int_tuple, str2bool

PN_SHORTCUTS = {'256': '1_2_3_4_5_6_8_10_13_16', '512': '1_2_3_4_6_9_13_18_24_32',
                '1024': '1_2_3_4_5_7_9_12_16_21_27_36_48_64'}
PLACEHOLDER_DATA_PATH = '/path/to/imagenet'


def _f(default, help: str, aliases: Sequence[str] = (), choices: Optional[Sequence] = None):
    """A dataclass field carrying its CLI help (and optional flag aliases / choices)."""
    if isinstance(default, (list, dict)):
        raise TypeError('use tuples for sequence defaults')
    return field(default=default, metadata=dict(help=help, aliases=tuple(aliases), choices=choices))


@dataclass
class DataArgs:
    """Where the images are and how they are augmented."""
    data_path: str = _f(PLACEHOLDER_DATA_PATH, 'ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG')
    pn: str = _f('1_2_3_4_5_6_8_10_13_16', "token-map sides per scale, '_'-separated, or 256/512/1024")
    patch_size: int = _f(16, 'pixels per token at the last scale (= the tokenizer downsampling)')
    mid_reso: float = _f(1.125, 'resize the shorter side to mid_reso * final resolution, then crop')
    hflip: bool = _f(False, 'random horizontal flip on train images')
    workers: int = _f(0, 'DataLoader worker processes per rank (0: load in the main process)')
    num_classes: int = _f(0, 'classes of the model (0: the number of class folders in train/)')


@dataclass
class ModelArgs:
    """The transformer and the frozen tokenizer."""
    depth: int = _f(16, 'VAR depth; width 64*depth and heads = depth unless --width/--heads')
    use_implicit: bool = _f(False, 'train VIAR (pre blocks, one implicit block, post blocks) instead of VAR')
    p_depth: int = _f(5, 'VIAR: explicit blocks before and after the implicit block')
    ini: float = _f(-1.0, 'init std of Linear/Embedding weights (-1: sqrt(1/(3*width)))')
    hd: float = _f(0.02, 'head weight multiplier at init')
    aln: float = _f(0.5, 'multiplier of the AdaLN linear init')
    alng: float = _f(1e-5, 'multiplier of the AdaLN gamma channels at init')
    saln: bool = _f(False, 'one AdaLN linear shared by all blocks')
    anorm: bool = _f(True, 'L2-normalised attention')
    width: int = _f(0, 'embedding width override (0: 64*depth)')
    heads: int = _f(0, 'attention heads override (0: depth)')
    drop_path: float = _f(-1.0, 'max drop-path rate (-1: official 0.1*depth/24)')
    cond_drop: float = _f(0.1, 'probability of replacing the class by the null class (for CFG)')
    jfb_n: Tuple[int, ...] = _f((0, 10), 'S-JFB: range of iterations without grad, e.g. 0_10 (inclusive)')
    jfb_m: Tuple[int, ...] = _f((1, 12), 'S-JFB: range of iterations with grad, e.g. 1_12 (inclusive)')
    vae_ckpt: str = _f('', 'tokenizer weights (e.g. ckpts/vae_ch160v4096z32.pth); empty: random weights (tests/demo only)')
    V: int = _f(4096, 'tokenizer vocabulary')
    Cvae: int = _f(32, 'tokenizer code dimension')
    vae_ch: int = _f(160, 'tokenizer base channels', aliases=('--vch',))
    vae_ch_mult: Tuple[int, ...] = _f((1, 1, 2, 2, 4), 'tokenizer channel multipliers (downsampling 2^(len-1))')
    vae_num_res_blocks: int = _f(2, 'tokenizer res blocks per level')


@dataclass
class OptimArgs:
    """Optimizer, precision and batch."""
    bs: int = _f(768, 'global batch size per optimizer step (split over ranks and --ac)')
    ac: int = _f(1, 'gradient accumulation steps')
    tblr: float = _f(1e-4, 'base lr; peak lr = tblr * bs / 256 unless --tlr')
    tlr: Optional[float] = _f(None, 'peak lr (overrides tblr * bs / 256)')
    twd: float = _f(0.05, 'initial weight decay')
    twde: float = _f(0.0, 'final weight decay (0: same as --twd)')
    tclip: float = _f(2.0, 'gradient-norm clip (<= 0: off)')
    ls: float = _f(0.0, 'label smoothing of the training cross-entropy')
    opt: str = _f('adamw', 'optimizer', choices=('adam', 'adamw'))
    afuse: bool = _f(True, 'fused AdamW where the device supports it')
    fp16: int = _f(0, 'mixed precision: 0 fp32, 1 fp16 (GradScaler), 2 bf16', choices=(0, 1, 2))
    bf16: bool = _f(False, 'same as --fp16 2')
    ema: float = _f(0.0, 'EMA decay of the weights (0: off), e.g. 0.9999')
    grad_ckpt: bool = _f(False, 'activation checkpointing of every block (less memory, ~30%% more compute)')
    compile: bool = _f(False, 'torch.compile the transformer')
    tf32: bool = _f(True, 'TF32 matmuls on Ampere+ GPUs')
    max_nonfinite: int = _f(20, 'stop after this many non-finite losses in a row (each such step is skipped)')


@dataclass
class ScheduleArgs:
    """Length of training, lr/wd schedule and progressive training."""
    ep: int = _f(250, 'epochs')
    wp: float = _f(0.0, 'warmup epochs (0: ep/50)')
    wp0: float = _f(0.005, 'lr ratio at the start of warmup')
    wpe: float = _f(0.01, 'lr ratio at the end of training')
    sche: str = _f('lin0', 'lr schedule after warmup: lin0, lin, lin00, lin<T>, cos, exp')
    pg: float = _f(0.0, 'progressive training over the first pg fraction of steps (0: off)')
    pg0: int = _f(4, 'progressive training: first scale index trained')
    pgwp: float = _f(0.0, 'progressive training: warmup epochs per stage (0: ep/300)')
    max_steps: int = _f(0, 'stop after this many optimizer steps; the schedule spans them (0: ep epochs)')


@dataclass
class RunArgs:
    """Outputs, logging, checkpoints, seeds and test hooks."""
    exp_name: str = _f('text', 'experiment name (logged)')
    local_out_dir_path: str = _f('local_output', 'output folder: checkpoints, log.txt, tensorboard')
    seed: int = _f(0, 'seed; rank r uses seed*world+r for torch/numpy/python, S-JFB draws use (seed, step)')
    device: str = _f('auto', 'auto, cuda or cpu')
    save_freq: int = _f(5, 'validate and save ar-ckpt-last.pth every this many epochs (and at the end)')
    save_every_steps: int = _f(0, 'also save ar-ckpt-last.pth every this many steps (0: off)')
    val_every: int = _f(0, 'also validate every this many steps (0: only when saving per epoch)')
    log_every: int = _f(0, 'progress line every this many steps (0: ~20 per epoch)')
    step_log: bool = _f(False, 'every rank appends one JSON line per step (loss, n, m, lr) to steps-rank<r>.jsonl')
    kill_at_step: int = _f(-1, 'test hook: SIGKILL this process right after step N (from 1; not after a torchrun restart; -1: off)')
    nan_at_steps: str = _f('', 'test hook: make the loss NaN at these steps (from 1), e.g. 3_4_5 or 3-9')


GROUPS = (('data', DataArgs), ('model', ModelArgs), ('optim', OptimArgs), ('sched', ScheduleArgs), ('run', RunArgs))


@dataclass
class TrainArgs:
    """All training flags, grouped."""
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
    world_size: int
    batch_size: int            # per rank per forward
    glb_batch_size: int        # per forward over all ranks (= bs / ac)
    lr: float                  # peak lr
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
    workers: int
    width: int
    heads: int
    jfb_no_grad: Tuple[int, int]
    jfb_with_grad: Tuple[int, int]
    nan_steps: Tuple[int, ...]
    tb_dir: str
    log_txt: str
    last_ckpt: str
    best_ckpt: str
    slim_path: str


def _parse_range(name: str, value: Sequence[int], lo: int) -> Tuple[int, int]:
    if len(value) != 2 or value[0] > value[1] or value[0] < lo:
        raise SystemExit(f'--{name} must be two integers a_b with {lo} <= a <= b (e.g. {lo}_10); got {value}')
    return int(value[0]), int(value[1])


def parse_steps(text: str) -> Tuple[int, ...]:
    """'3_4_5' or '3,4' -> (3, 4, 5); 'a-b' -> every step in [a, b]."""
    text = text.strip()
    if not text:
        return ()
    try:
        if '-' in text:
            a, b = (int(t) for t in text.split('-'))
            return tuple(range(a, b + 1))
        return tuple(int(t) for t in re.split(r'[_,]', text) if t)
    except ValueError:
        raise SystemExit(f"--nan_at_steps must look like 3_4_5 or 3-9, got {text!r}") from None


def derive(args: TrainArgs, world_size: int) -> Derived:
    """Every value that follows from the flags; bad combinations are a SystemExit with the fix."""
    d, m, o, s, r = args.data, args.model, args.optim, args.sched, args.run
    if o.ac < 1 or o.bs < 1:
        raise SystemExit(f'--bs and --ac must be positive (got --bs {o.bs} --ac {o.ac})')
    split = o.ac * world_size
    if o.bs % split != 0:
        raise SystemExit(f'--bs {o.bs} cannot be split over {world_size} rank(s) x {o.ac} accumulation step(s): '
                         f'use a multiple of {split}.')
    batch_size = o.bs // split
    pn = PN_SHORTCUTS.get(d.pn, d.pn)
    try:
        patch_nums = tuple(int(t) for t in pn.replace('-', '_').split('_'))
    except ValueError:
        raise SystemExit(f"--pn must be sides like 1_2_3_4_5_6_8_10_13_16 (or 256/512/1024), got {d.pn!r}") from None
    downsample = 2 ** (len(m.vae_ch_mult) - 1)
    if d.patch_size != downsample:
        raise SystemExit(f'--patch_size {d.patch_size} must equal the tokenizer downsampling 2^(len(vae_ch_mult)-1) '
                         f'= {downsample} (--vae_ch_mult {"_".join(map(str, m.vae_ch_mult))}).')
    resos = tuple(p * d.patch_size for p in patch_nums)
    final_reso = max(resos)
    if o.bf16 and o.fp16 == 1:
        raise SystemExit('--fp16 1 (fp16) and --bf16 both given: pick one (--bf16 is the same as --fp16 2).')
    precision = 'bf16' if (o.bf16 or o.fp16 == 2) else ('fp16' if o.fp16 == 1 else 'fp32')
    width = m.width or 64 * m.depth
    heads = m.heads or m.depth
    if width % heads != 0:
        raise SystemExit(f'width {width} must be divisible by heads {heads} (--width/--heads)')
    if m.use_implicit and 2 * m.p_depth >= m.depth:
        raise SystemExit(f'--use_implicit needs 2 * --p_depth < --depth (got p_depth {m.p_depth}, depth {m.depth})')
    sche = f'lin{s.pg:g}' if s.pg > 0 else s.sche
    tb_name = re.sub(r'[^\w\-+,.]', '_', f'tb-VARd{m.depth}__pn{pn}__b{o.bs}ep{s.ep}{o.opt[:4]}lr{o.tblr:g}wd{o.twd:g}')
    out = r.local_out_dir_path
    return Derived(
        world_size=world_size, batch_size=batch_size, glb_batch_size=batch_size * world_size,
        lr=o.tlr if o.tlr is not None else o.tblr * o.bs / 256,
        wd=o.twd, wd_end=o.twde or o.twd,
        wp_ep=s.wp or s.ep / 50, pgwp_ep=s.pgwp or s.ep / 300, sche=sche,
        patch_nums=patch_nums, resos=resos, final_reso=final_reso, mid_reso_px=round(d.mid_reso * final_reso),
        precision=precision, workers=min(max(0, d.workers), batch_size), width=width, heads=heads,
        jfb_no_grad=_parse_range('jfb_n', m.jfb_n, 0), jfb_with_grad=_parse_range('jfb_m', m.jfb_m, 1),
        nan_steps=parse_steps(r.nan_at_steps),
        tb_dir=os.path.join(out, tb_name), log_txt=os.path.join(out, 'log.txt'),
        last_ckpt=os.path.join(out, 'ar-ckpt-last.pth'), best_ckpt=os.path.join(out, 'ar-ckpt-best.pth'),
        slim_path=os.path.join(out, 'var-slim.pth'),
    )


def iters_per_epoch(dataset_len: int, glb_batch_size: int) -> int:
    """Forward passes per epoch: the last batch is filled up from the start of the permutation (official)."""
    return max(1, math.ceil(dataset_len / glb_batch_size))


def total_forwards(args: TrainArgs, iters_ep: int) -> int:
    """Forward passes of the whole run: ep epochs, or --max_steps optimizer steps when given."""
    full = args.sched.ep * iters_ep
    return min(full, args.sched.max_steps * args.optim.ac) if args.sched.max_steps > 0 else full


# ---------------------------------------------------------------- CLI generated from the dataclasses

def _arg_type(tp):
    if tp is bool:
        return dict(type=str2bool, nargs='?', const=True, metavar='BOOL')
    if tp in (int, float, str):
        return dict(type=tp)
    if tp in (Optional[float],):
        return dict(type=float)
    if tp in (Tuple[int, ...],):
        return dict(type=int_tuple, metavar='A_B')
    raise TypeError(f'no CLI type for {tp}')


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one flag per dataclass field, grouped as the dataclasses are."""
    parser = argparse.ArgumentParser(description='Train VAR / VIAR (torchrun for several GPUs).',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    seen = set()
    for group_name, clz in GROUPS:
        g = parser.add_argument_group(group_name, clz.__doc__)
        for f in dataclasses.fields(clz):
            assert f.name not in seen, f'flag --{f.name} defined twice'
            seen.add(f.name)
            kw = _arg_type(f.type)
            if f.metadata.get('choices'):
                kw['choices'] = f.metadata['choices']
            g.add_argument(f'--{f.name}', *f.metadata.get('aliases', ()), dest=f.name, default=f.default,
                           help=f.metadata.get('help', ''), **kw)
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
    groups = {name: clz(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(clz)}) for name, clz in GROUPS}
    return TrainArgs(**groups)


def args_from_dict(d: Dict[str, Dict]) -> TrainArgs:
    """Inverse of TrainArgs.to_dict (unknown keys from other versions are dropped)."""
    groups = {}
    for name, clz in GROUPS:
        known = {f.name for f in dataclasses.fields(clz)}
        vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.get(name, {}).items() if k in known}
        groups[name] = clz(**vals)
    return TrainArgs(**groups)


def format_args(args: TrainArgs) -> str:
    """One 'name: value' line per flag, for the log."""
    return '\n'.join(f'  {k:20s}: {v}' for k, v in args.flat().items())
