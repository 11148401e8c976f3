"""Prepare a VAR/VIAR for sampling: optional torch.compile of the per-scale compute, bf16/fp16 autocast.

    sampler = prepare_for_sampling(var, compile=args.compile, dtype=args.dtype)
    img = sampler(B, label_B, g_seed=seed, cfg=1.5, schedule=schedule)   # = var.autoregressive_infer_cfg

fp32 without compile is exactly `var.autoregressive_infer_cfg` (bit for bit). compile=True compiles,
in place (`nn.Module.compile`), every transformer block, VIAR's input-injection projection, the head
norm and (compile_vae) the VQVAE decoder; the Python parts (scale loop, KV-cache bookkeeping,
sampling) stay eager, and each block's graph breaks at its KV-cache write. The blocks' shapes are
dynamic, so all scales share a handful of graphs (scale 0, whose token count is 1, gets its own).
On CUDA the blocks' default mode is 'reduce-overhead' (CUDA graphs), which removes the kernel-launch
overhead that dominates the small early scales.
Compiled kernels sum in another order, so compiled samples match eager ones within float tolerance.
"""
import contextlib
from typing import List, Optional

import torch
import torch.nn as nn

AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class SamplingError(ValueError):
    """A sampling option this machine or model cannot honour (the message says what to change)."""


def resolve_dtype(device_type: str, dtype: str) -> str:
    """'auto' -> 'fp16' on CUDA (as the official scripts), 'fp32' elsewhere; other names unchanged."""
    if dtype == 'auto':
        return 'fp16' if device_type == 'cuda' else 'fp32'
    if dtype not in AUTOCAST_DTYPES:
        raise SamplingError(f"dtype must be one of {sorted(AUTOCAST_DTYPES) + ['auto']}, got {dtype!r}")
    return dtype


def autocast_for(device_type: str, dtype: str):
    """torch.autocast for 'bf16' / 'fp16'; a null context for 'fp32' ('auto' resolved first)."""
    dtype = resolve_dtype(device_type, dtype)
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[dtype])


def default_mode(device_type: str) -> Optional[str]:
    """torch.compile mode: CUDA graphs on a GPU (launch-bound early scales), inductor's default elsewhere."""
    return 'reduce-overhead' if device_type == 'cuda' else None


def compile_targets(var: nn.Module) -> List[nn.Module]:
    """The modules whose forward runs in the scale loop (the model says which: blocks, head norm, VIAR's projection)."""
    return var.scale_loop_modules()


class Sampler:
    """Callable with the signature of `var.autoregressive_infer_cfg`, run under the chosen autocast."""

    def __init__(self, var: nn.Module, dtype: str = 'fp32', compiled: bool = False, mode: Optional[str] = None):
        self.var, self.dtype, self.compiled, self.mode = var, dtype, compiled, mode
        self.device = var.lvl_1L.device
        self.device_type = self.device.type

    def autocast(self):
        """The autocast context the sampler runs in."""
        return autocast_for(self.device_type, self.dtype)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with self.autocast():
            return self.var.autoregressive_infer_cfg(*args, **kwargs)

    def __repr__(self) -> str:
        return f'Sampler(dtype={self.dtype}, compiled={self.compiled}, mode={self.mode})'


def prepare_for_sampling(var: nn.Module, compile: bool = False, dtype: str = 'fp32', mode: Optional[str] = None,
                         backend: str = 'inductor', compile_vae: bool = True) -> Sampler:
    """Put `var` in eval mode, optionally compile its scale-loop modules (and its VQVAE decoder) in place;
    return a Sampler.

    dtype: 'fp32', 'bf16', 'fp16' or 'auto' (fp16 on CUDA, fp32 elsewhere), the autocast of every call.
    mode: torch.compile mode (None: 'reduce-overhead' on CUDA, the default elsewhere).
    backend: torch.compile backend ('inductor'; 'aot_eager' checks graph capture without code generation).
    compile_vae: with compile, also compile the VQVAE decoder (static shapes, default mode: it is
    compute-bound; on CPU inductor fuses its GroupNorm + SiLU, about 1.35x faster at 128 px).
    """
    device_type = var.lvl_1L.device.type
    dtype = resolve_dtype(device_type, dtype)   # a bad dtype fails before any compile work
    var.eval()
    mode = mode if mode is not None else default_mode(device_type)
    if compile:
        for m in compile_targets(var):
            m.compile(backend=backend, mode=mode, dynamic=True)
        if compile_vae:
            var.vae_proxy[0].decoder.compile(backend=backend)
    return Sampler(var, dtype=dtype, compiled=compile, mode=mode if compile else None)

