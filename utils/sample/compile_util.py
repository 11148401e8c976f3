"""Prepare a VAR/VIAR for sampling: precision (autocast), the fast path, torch.compile of the per-scale compute.

    sampler = prepare_for_sampling(var, compile=args.compile, dtype=args.dtype, fast=args.fast)
    img = sampler(B, label_B, g_seed=seed, cfg=1.5, schedule=schedule)   # = var.autoregressive_infer_cfg

fp32 without compile or fast is exactly `var.autoregressive_infer_cfg` (bit for bit, the official numbers). fast
(docs/SPEED.md, "The fast path") and compile keep the maths and change the rounding: their samples match the eager
ones within float tolerance. KV bookkeeping and the token draws stay eager.
"""
import contextlib
import functools
import os
import threading
from typing import FrozenSet, Iterable, Optional

import torch
import torch.nn as nn

from models.kv_cache import BufferPool

AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# relative residual ||G(z) - z|| / ||G(z)|| below which implicit iterations in this autocast dtype stop falling:
# on the demo's trained VIAR, 50 iterations per scale level off at 2.5e-3..3.5e-3 in bf16 and 3.2e-4..4.3e-4 in
# fp16 (fp32: 1.8e-7; docs/SPEED.md). An adaptive tau below it would run every scale to its cap.
RESIDUAL_FLOOR = {'bf16': 4e-3, 'fp16': 5e-4}


class SamplingError(ValueError):
    """A sampling option this machine or model cannot honour (the message says what to change)."""


def cpu_flags(cpuinfo_text: str) -> FrozenSet[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 'flags', ARM 'Features')."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(':')
        if sep and key.strip() in ('flags', 'Features'):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def read_cpu_flags(path: str = '/proc/cpuinfo') -> FrozenSet[str]:
    """This machine's CPU flags (empty where /proc/cpuinfo cannot be read, e.g. not Linux); read once per process
    (the dtype rule asks for them from several places of one run)."""
    try:
        with open(path) as f:
            return cpu_flags(f.read())
    except OSError:
        return frozenset()


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products
_BF16_ISAS = ('AVX512_CORE_BF16', 'AVX512_CORE_FP16', 'AVX512_CORE_AMX', 'AVX512_CORE_AMX_FP16', 'AVX10_1_512',
              'AVX10_1_512_AMX', 'AVX10_1_512_AMX_FP16', 'AVX10_2_512', 'AVX10_2_512_AMX_2', 'ALL', 'DEFAULT')


def native_bf16(flags: Iterable[str], max_isa: Optional[str] = None) -> bool:
    """Whether bf16 matmuls run natively: avx512_bf16 or amx_bf16 in the CPU flags, and no oneDNN ISA cap
    (`ONEDNN_MAX_CPU_ISA`, e.g. AVX2 to emulate an older machine) below the bf16 instructions."""
    flags = set(flags)
    if not flags & {'avx512_bf16', 'amx_bf16'}:
        return False
    return not max_isa or max_isa.strip().upper() in _BF16_ISAS


def fast_dtype(device_type: str, flags: Optional[Iterable[str]] = None, max_isa: Optional[str] = None) -> str:
    """The dtype `fast` picks for 'auto': fp16 on CUDA (the official sampling), bf16 on a CPU with native bf16,
    fp32 elsewhere (a CPU without it runs bf16 slower than fp32). flags/max_isa default to this machine's."""
    if device_type == 'cuda':
        return 'fp16'
    if device_type != 'cpu':
        return 'fp32'
    if flags is None:
        flags, max_isa = read_cpu_flags(), os.environ.get('ONEDNN_MAX_CPU_ISA')
    return 'bf16' if native_bf16(flags, max_isa) else 'fp32'


def resolve_dtype(device_type: str, dtype: str, fast: bool = False) -> str:
    """'auto' -> 'fp16' on CUDA (as the official scripts), 'fp32' elsewhere, or with fast `fast_dtype` (bf16 on
    a CPU with native bf16); other names unchanged."""
    if dtype == 'auto':
        if fast:
            return fast_dtype(device_type)
        return 'fp16' if device_type == 'cuda' else 'fp32'
    if dtype not in AUTOCAST_DTYPES:
        raise SamplingError(f"dtype must be one of {sorted(AUTOCAST_DTYPES) + ['auto']}, got {dtype!r}")
    return dtype


def sampling_tf32(dtype: str) -> bool:
    """Whether sampling lets CUDA run float32 matmuls and convolutions in TF32, for a resolved dtype: not for 'fp32',
    which asks for full precision; for 'fp16' / 'bf16' yes (the official script's setting), where autocast already
    runs the blocks' matmuls in 16 bits."""
    return dtype in ('bf16', 'fp16')


def autocast_for(device_type: str, dtype: str):
    """torch.autocast for 'bf16' / 'fp16'; a null context for 'fp32' ('auto' resolved first)."""
    dtype = resolve_dtype(device_type, dtype)
    if AUTOCAST_DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[dtype])


# torch.compile modes that replay CUDA graphs (CUDA graph trees) on a GPU
CUDAGRAPH_MODES = ('reduce-overhead', 'max-autotune')


# what `compile` compiles: each scale-loop module (dynamic shapes), or one graph per scale step
COMPILE_SCOPES = ('modules', 'scale')


def compile_mode(device_type: str, requested: Optional[str] = None, scope: str = 'modules') -> Optional[str]:
    """The torch.compile mode: `requested`, else inductor's default (scope 'scale' on CUDA: 'reduce-overhead', CUDA
    graphs). With scope 'modules' a CUDA-graph mode is refused on CUDA.

    The modules are compiled one by one and the eager scale loop chains them. CUDA graph trees start a new
    generation at each call of a compiled module and hand the previous call's outputs back to their memory pool,
    while the next block takes that output as its input and the solver's residual and the iterate hooks read the
    previous iterate after the next call; in the web app's worker threads their set-up also asserts on
    thread-local state. So CUDA graphs need the scale step captured as one graph (scope 'scale').
    """
    if scope not in COMPILE_SCOPES:
        raise SamplingError(f'compile scope must be one of {", ".join(COMPILE_SCOPES)}, got {scope!r}')
    if requested is None and scope == 'scale' and device_type == 'cuda':
        return 'reduce-overhead'   # what the scale scope is for: CUDA graphs replay each scale
    if device_type == 'cuda' and requested in CUDAGRAPH_MODES and scope == 'modules':
        raise SamplingError(f'torch.compile mode {requested!r} replays CUDA graphs, which the separately compiled '
                            f'blocks of the scale loop cannot use (each call would free the output the next one '
                            f'reads); compile scope scale, or leave mode unset, or pass max-autotune-no-cudagraphs.')
    return requested


class Sampler:
    """Callable with the signature of `var.autoregressive_infer_cfg`, run under the chosen autocast (and, fast,
    on the model's fast path). runner: the model that samples (`var`, or its `sampling_copy`); scale_step:
    its compiled `scale_logits` (scope 'scale'), whose KV buffers come from the Sampler's pool, one call at a time."""

    def __init__(self, var: nn.Module, dtype: str = 'fp32', compiled: bool = False, mode: Optional[str] = None,
                 fast: bool = False, runner: Optional[nn.Module] = None, scale_step=None):
        self.var, self.dtype, self.compiled, self.mode, self.fast = var, dtype, compiled, mode, fast
        self.runner = var if runner is None else runner
        self.device = var.lvl_1L.device
        self.scale_step, self.pool = scale_step, BufferPool() if scale_step is not None else None
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if self.fast:
            kwargs.setdefault('fast', True)
        if self.scale_step is None:
            with autocast_for(self.device.type, self.dtype):
                return self.runner.autoregressive_infer_cfg(*args, **kwargs)
        # one graph per scale (and schedule): more than dynamo's default limit of 8 per function
        with self.lock, torch._dynamo.config.patch(recompile_limit=64), autocast_for(self.device.type, self.dtype):
            self.pool.reset()
            return self.runner.autoregressive_infer_cfg(*args, scale_step=self.scale_step, alloc=self.pool, **kwargs)

    def __repr__(self) -> str:
        scope = ', scope=scale' if self.scale_step is not None else ''
        return f'Sampler(dtype={self.dtype}, compiled={self.compiled}, mode={self.mode}, fast={self.fast}{scope})'


def set_decoder_layout(vae: nn.Module, layout: torch.memory_format) -> None:
    """The VQVAE decoder's conv weights in `layout`, in place: channels_last (fast: oneDNN's native layout, no
    reorder around each convolution; other rounding) or contiguous (the exact path: the official arithmetic)."""
    vae.post_quant_conv.to(memory_format=layout)
    vae.decoder.to(memory_format=layout)


def prepare_for_sampling(var: nn.Module, compile: bool = False, dtype: Optional[str] = None,
                         mode: Optional[str] = None, backend: str = 'inductor', compile_vae: bool = True,
                         fast: bool = False, scope: str = 'modules') -> Sampler:
    """Put `var` in eval mode, optionally compile its scale-loop modules (and its VQVAE decoder) in place;
    return a Sampler.

    dtype: 'fp32', 'bf16', 'fp16' or 'auto' (`resolve_dtype`), the autocast of every call; the Sampler's `dtype` is
    the resolved one. None: 'auto' with fast (as --fast on the command line), 'fp32' without (the official numbers).
    fast: VIAR's input injection once per scale, top-k draws over the candidates only (the same distribution, another
    RNG stream), a channels_last VQVAE decoder; False keeps the official arithmetic. In bf16 or fp16 it samples with
    `var.sampling_copy`: Linear weights cast once here, not in every call (prepare again after loading weights into
    var); var keeps its fp32 weights for the exact path. In fp32 the copy shares var's tensors; on a CPU its blocks'
    Linear layers run through oneDNN.
    scope (COMPILE_SCOPES): 'modules' compiles, in place, the modules the scale loop runs (`var.scale_loop_modules()`,
    dynamic shapes: all scales share a handful of graphs); 'scale' compiles one scale's whole step (`var.scale_logits`:
    blocks, implicit iterations, head, CFG mix) as one graph per scale with static shapes, its KV buffers handed out
    by the Sampler's `BufferPool` (fixed addresses, so CUDA graphs can replay a scale). A scale it cannot capture
    (an adaptive schedule, iterate hooks) runs eagerly.
    mode: torch.compile mode (None: inductor's default; `compile_mode` refuses CUDA-graph modes on CUDA for scope
    'modules'). backend: 'inductor' ('aot_eager' checks graph capture without code generation).
    compile_vae: with compile, also compile the VQVAE decoder (static shapes, default mode: it is compute-bound; on
    CPU inductor fuses its GroupNorm + SiLU, about 1.35x faster at 128 px).
    """
    device_type = var.lvl_1L.device.type
    dtype = resolve_dtype(device_type, dtype or ('auto' if fast else 'fp32'), fast)   # fails before any compile
    var.eval()
    set_decoder_layout(var.vae_proxy[0], torch.channels_last if fast else torch.contiguous_format)
    mode = compile_mode(device_type, mode, scope)
    low = AUTOCAST_DTYPES[dtype] if fast else None
    runner = var.sampling_copy(low) if fast else var
    step = None
    if compile and scope == 'scale':
        step = torch.compile(runner.scale_logits, backend=backend, mode=mode, dynamic=False)
    elif compile:
        for m in runner.scale_loop_modules():
            m.compile(backend=backend, mode=mode, dynamic=True)
    if compile and compile_vae:
        var.vae_proxy[0].decoder.compile(backend=backend)
    return Sampler(var, dtype=dtype, compiled=compile, mode=mode if compile else None, fast=fast, runner=runner,
                   scale_step=step)

