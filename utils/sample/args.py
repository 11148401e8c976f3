"""Command-line pieces shared by `gen_img.py` and `sampling.py`: booleans, model flags, iteration schedules.

Each `add_*_args(parser)` adds one group of flags (official names kept); the matching `*_from_args(args)`
turns the parsed namespace into the object the code uses, so the mapping lives in one place.
"""
import argparse
from typing import Optional

import torch

from models.schedules import IterSchedule, from_cli
from utils.sample.compile_util import AUTOCAST_DTYPES as DTYPES, SamplingError, autocast_for, prepare_for_sampling
from utils.model_io import DEFAULT_VAE_CKPT, ModelSpec

_TRUE = {'1', 'true', 't', 'yes', 'y', 'on'}
_FALSE = {'0', 'false', 'f', 'no', 'n', 'off'}


def str2bool(value) -> bool:
    """'True'/'false'/'1'/'no'... -> bool; used with nargs='?' so a bare flag means True."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (True/False, 1/0, yes/no), got {value!r}')


def add_bool_arg(parser: argparse.ArgumentParser, name: str, default: bool = False, help: str = ''):
    """A boolean flag accepting `--name`, `--name True` and `--name False`."""
    parser.add_argument(name, type=str2bool, nargs='?', const=True, default=default, metavar='BOOL', help=help)


def int_tuple(text: str) -> tuple:
    """'1,2,3,4' or '1_2_3_4' -> (1, 2, 3, 4)."""
    try:
        return tuple(int(t) for t in str(text).replace('_', ',').split(',') if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers like 1,2,3,4, got {text!r}') from None


# ---------------------------------------------------------------- model

def add_model_args(parser: argparse.ArgumentParser, depth: int = 16, var_ckpt: Optional[str] = None,
                   vae_ckpt: Optional[str] = None, dtype: str = 'fp32',
                   compile_flag: bool = True):
    """--depth --use_implicit --pre_depth --post_depth --var_ckpt/--ckpt_path --vae_ckpt --device --dtype
    and (compile_flag) --compile.

    vae_ckpt=None: the tokenizer a slim export embeds, else the official file (utils/model_io.load_models);
    with random transformer weights the scripts use a random tokenizer.
    """
    g = parser.add_argument_group('model')
    g.add_argument('--depth', type=int, default=depth, help='transformer depth (official: 16, 20, 24, 30)')
    add_bool_arg(g, '--use_implicit', False, 'VIAR (implicit block) instead of VAR; `--use_implicit True/False`')
    g.add_argument('--pre_depth', type=int, default=5, help='VIAR: explicit blocks before the implicit block')
    g.add_argument('--post_depth', type=int, default=5, help='VIAR: explicit blocks after the implicit block')
    g.add_argument('--var_ckpt', '--ckpt_path', dest='var_ckpt', type=str, default=var_ckpt,
                   help='transformer checkpoint: a path, an official name (var_d16.pth, viar.pth: downloaded '
                        'into ckpts/ if missing) or a slim export (carries its own config)')
    g.add_argument('--vae_ckpt', type=str, default=vae_ckpt,
                   help=f'VQVAE tokenizer checkpoint; default: the one a slim export embeds, else the official '
                        f'{DEFAULT_VAE_CKPT} (downloaded when missing)')
    g.add_argument('--device', type=str, default='', help='cuda, cuda:1, cpu; default cuda when available')
    g.add_argument('--dtype', type=str, default=dtype, choices=sorted(DTYPES) + ['auto'],
                   help='autocast dtype for sampling: fp32 = no autocast; auto = fp16 on CUDA (the official '
                        'scripts), fp32 on CPU')
    if compile_flag:
        g.add_argument('--compile', action='store_true',
                       help='torch.compile the blocks, the head and the VQVAE decoder (CUDA graphs on a GPU); '
                            'the first batch compiles. Samples equal the eager ones within float tolerance')
    return g


def add_size_args(parser: argparse.ArgumentParser):
    """Size flags for checkpoints without a config (random-weight demos, tiny models); None = official size."""
    g = parser.add_argument_group('model size (only for files without a config, or --var_ckpt random)')
    g.add_argument('--width', type=int, default=None, help='embedding width (default 64 * depth)')
    g.add_argument('--heads', type=int, default=None, help='attention heads (default depth)')
    g.add_argument('--patch_nums', type=int_tuple, default=None, help='scales, e.g. 1,2,3,4,5,6,8,10,13,16')
    g.add_argument('--V', type=int, default=None, help='VQVAE vocabulary size (4096)')
    g.add_argument('--Cvae', type=int, default=None, help='VQVAE code dimension (32)')
    g.add_argument('--vae_ch', type=int, default=None, help='VQVAE base channels (160)')
    g.add_argument('--vae_ch_mult', type=int_tuple, default=None, help='VQVAE channel multipliers (1,1,2,2,4)')
    g.add_argument('--vae_num_res_blocks', type=int, default=None, help='VQVAE res blocks per level (2)')
    g.add_argument('--num_classes', type=int, default=None, help='number of classes (1000)')
    return g


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """ModelSpec from the model flags; size flags not given (or not added) keep the official values."""
    spec = ModelSpec(depth=args.depth, use_implicit=bool(args.use_implicit), pre_depth=args.pre_depth,
                     post_depth=args.post_depth)
    sizes = dict(embed_dim='width', num_heads='heads', patch_nums='patch_nums', V='V', Cvae='Cvae',
                 vae_ch='vae_ch', vae_ch_mult='vae_ch_mult', vae_num_res_blocks='vae_num_res_blocks',
                 num_classes='num_classes')
    for field_name, flag in sizes.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(spec, field_name, value)
    return spec


def resolve_device(name: str = '') -> torch.device:
    """'' or 'auto' -> cuda when available, else cpu; a CUDA request without CUDA is a clear error."""
    if not name or name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {name}: CUDA is not available on this machine; use --device cpu.')
    return device


def autocast_context(device: torch.device, dtype: str = 'fp32'):
    """torch.autocast for bf16/fp16 on the device's type; fp32 runs without autocast; auto = fp16 on CUDA only."""
    try:
        return autocast_for(torch.device(device).type, dtype)
    except SamplingError as e:
        raise SystemExit(f'--dtype: {e}') from None


def prepare_from_args(args: argparse.Namespace, var) -> None:
    """Eval mode and, with --compile, torch.compile of the scale-loop modules and the VQVAE decoder (in place).

    The scripts keep calling `var.autoregressive_infer_cfg` under `autocast_context`; compiled modules are
    picked up because `nn.Module.compile` replaces each module's forward in place.
    """
    try:
        prepare_for_sampling(var, compile=getattr(args, 'compile', False), dtype=args.dtype)
    except SamplingError as e:
        raise SystemExit(f'error: {e}') from None


# ---------------------------------------------------------------- iteration schedule

def add_schedule_args(parser: argparse.ArgumentParser):
    """--iter_left --iter_right --iters --tau --tau_json --tau_cap --stop_mode --official_kv (VIAR only)."""
    g = parser.add_argument_group('implicit iterations per scale (VIAR; ignored by VAR)')
    g.add_argument('--iter_left', type=int, default=10, help='official knob: linspace(iter_left, iter_right) per scale')
    g.add_argument('--iter_right', type=int, default=10, help='see --iter_left; Con.(10,10) by default')
    g.add_argument('--iters', type=str, default='',
                   help='explicit per-scale counts, e.g. 20,18,16,14,12,10,8,6,5,5 (with --tau: per-scale caps)')
    g.add_argument('--tau', type=str, default='',
                   help='adaptive: stop a scale once the residual <= tau (one value or one per scale)')
    g.add_argument('--tau_json', type=str, default='', help="adaptive: per-scale tau from convergence.py's JSON")
    g.add_argument('--tau_cap', type=int, default=0, help='adaptive: iteration cap per scale (default max(left, right))')
    g.add_argument('--stop_mode', type=str, default='rel', choices=('rel', 'abs'),
                   help='adaptive: residual relative to ||G(z)|| (rel) or absolute (abs)')
    add_bool_arg(g, '--official_kv', False,
                 'attend, as the official code, to no earlier scale at an iteration index that scale never ran '
                 '(only differs where a scale runs more iterations than an earlier one)')
    return g


def schedule_from_args(args: argparse.Namespace, num_scales: int) -> IterSchedule:
    """The IterSchedule the schedule flags describe; bad values become a clear SystemExit."""
    try:
        return from_cli(num_scales, iter_left=args.iter_left, iter_right=args.iter_right, iters=args.iters,
                        tau=args.tau, tau_json=args.tau_json, cap=args.tau_cap, stop_mode=args.stop_mode)
    except (ValueError, OSError) as e:
        raise SystemExit(f'bad iteration schedule flags: {e}') from None


def fill_forward_from_args(args: argparse.Namespace) -> bool:
    """`autoregressive_infer_cfg(fill_forward=...)`: False with --official_kv."""
    return not bool(getattr(args, 'official_kv', False))


def sampling_kwargs(args: argparse.Namespace, num_scales: int) -> dict:
    """Keyword arguments of `autoregressive_infer_cfg` shared by the scripts (schedule and KV behaviour)."""
    return dict(schedule=schedule_from_args(args, num_scales), fill_forward=fill_forward_from_args(args))

