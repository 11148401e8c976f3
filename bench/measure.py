"""The benchmarks' shared harness: the project root, the machine, memory, timing, and child processes.

Imports nothing from the project at import time, so the official implementation's runner (whose packages are
also called `models` and `utils`) can use it too: project modules it needs are loaded by path. A sampling child
serves one config: it reads JSON commands on stdin and answers one JSON line each on a private copy of stdout,
while anything the model code prints goes to stderr.
"""
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project root, above bench/


def load_project_module(name: str, relpath: str):
    """A project module that imports nothing from the project, loaded from its file under a private name."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the machine

def machine_name() -> str:
    """CPU model and core count."""
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass
    return f'{name}, {os.cpu_count()} cores'


def machine_facts() -> dict:
    """CPU model, the SIMD flags that decide CPU GEMM speed, the load average now and torch's version: what every
    benchmark JSON records beside its figures."""
    from utils.sample.compile_util import read_cpu_flags
    flags = read_cpu_flags()
    return dict(cpu=machine_name(), avx2='avx2' in flags, avx512f='avx512f' in flags,
                avx512_bf16='avx512_bf16' in flags, amx='amx_bf16' in flags,
                load_avg=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__)


def machine_line(flags=('avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'sha_ni')) -> str:
    """The machine in one printed line: CPU model and cores, which of `flags` it has, the load average now."""
    from utils.sample.compile_util import read_cpu_flags
    simd = ' '.join(f for f in flags if f in read_cpu_flags())
    return f'{machine_name()} ({simd}), load {" ".join(f"{x:.1f}" for x in os.getloadavg())}'


# ---------------------------------------------------------------- memory (utils/memory.py, loaded by path)

memory = load_project_module('viar_project_memory', os.path.join('utils', 'memory.py'))


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA allocator stats on a GPU, VmHWM on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    memory.reset_peak_rss()


def peak_so_far(device: torch.device, overall: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Peak RSS of this process (or the running maximum `timed_call` kept in `overall`), plus CUDA max
    allocated bytes on a GPU."""
    seen = (overall or {}).get('peak', 0)
    if device.type == 'cuda':
        return {'peak_rss_bytes': memory.peak_rss_bytes(),
                'cuda_max_allocated_bytes': max(seen, int(torch.cuda.max_memory_allocated(device)))}
    return {'peak_rss_bytes': max(seen, memory.peak_rss_bytes())}


# ---------------------------------------------------------------- timing

def memory_probe(fn: Callable[[], Any], device: torch.device, decode: 'DecodeTimer',
                 overall: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """One extra (untimed) call measuring memory: the baseline before it, the peak of its transformer phase
    and of its VAE decode. CPU: RSS after `release_freed_memory`; GPU: CUDA allocated bytes."""
    if device.type == 'cuda':
        sync(device)
        base = int(torch.cuda.memory_allocated(device))
    else:
        memory.release_freed_memory()
        base = memory.current_rss_bytes()
    r = timed_call(fn, device, decode, overall)
    return dict(base_bytes=base, transformer_peak_bytes=r['transformer_peak_bytes'],
                decode_peak_bytes=r['decode_peak_bytes'], peak_bytes=max(r['transformer_peak_bytes'], r['decode_peak_bytes']))


def counting_flops(fn: Callable[[], Any], box: Dict[str, int]) -> Callable[[], Any]:
    """fn, counting the floating-point operations of each call into box['flops'] (matmuls, convolutions,
    attention: torch's FlopCounterMode, 2 per multiply-add); compiled code it cannot count runs uncounted (0)."""
    from torch.utils.flop_counter import FlopCounterMode

    def call():
        try:
            with FlopCounterMode(display=False) as counter:
                out = fn()
            box['flops'] = int(counter.get_total_flops())
            return out
        except Exception:   # a compiled graph under a dispatch mode: time it, report no count
            box['flops'] = 0
            return fn()
    return call


def gemm_rate(dtype: torch.dtype, basis: str = 'wall', M: int = 1360, K: int = 768, N: int = 3072,
              reps: int = 20) -> float:
    """Peak FLOP/s of one (M, K) @ (K, N) matmul in `dtype` on this CPU with torch's current threads, best of
    `reps` calls after two warm-up calls (the default shape: a 256 px scale's FFN input at width 768).
    basis 'cpu' times by process CPU time (what other processes on a shared machine do not inflate) and
    scales by the thread count; 'wall' by the wall clock."""
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    clock = time.process_time if basis == 'cpu' else time.perf_counter
    best = float('inf')
    for i in range(reps + 2):
        t0 = clock()
        torch.mm(a, b)
        if i >= 2:
            best = min(best, clock() - t0)
    return 2 * M * K * N / best * (torch.get_num_threads() if basis == 'cpu' else 1)


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class DecodeTimer:
    """Times the VQVAE decode inside a sampling call (post_quant_conv's input to the decoder's output) and
    splits the call's peak memory into the transformer phase (before the decode) and the decode.

    Works for any VQVAE whose `fhat_to_img` runs `decoder(post_quant_conv(f_hat))` (ours and the official).
    The peaks are per call when the caller resets the peak before it (`timed_call` does).
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device):
        self.device, self.start, self.end = device, None, None
        self.peaks = {}
        self._hooks = [vae.post_quant_conv.register_forward_pre_hook(self._on_start),
                       vae.decoder.register_forward_hook(self._on_end)]

    def _on_start(self, module, args):
        sync(self.device)
        self.peaks['transformer'] = memory.peak_memory(self.device)['bytes']
        reset_peak_memory(self.device)
        self.start = (time.perf_counter(), time.process_time())

    def _on_end(self, module, args, output):
        sync(self.device)
        self.end = (time.perf_counter(), time.process_time())
        self.peaks['decode'] = memory.peak_memory(self.device)['bytes']

    def clear(self):
        self.start = self.end = None

    def elapsed(self):
        """(wall seconds, CPU seconds) of the last decode, or (0, 0) if none ran."""
        if self.start is None or self.end is None:
            return 0.0, 0.0
        return self.end[0] - self.start[0], self.end[1] - self.start[1]

    def remove(self):
        for h in self._hooks:
            h.remove()


def timed_call(fn: Callable[[], Any], device: torch.device, decode: Optional[DecodeTimer] = None,
               overall: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Run fn once; wall and process-CPU seconds for the whole call and for its VAE decode, and (with a
    DecodeTimer) the peak memory of the transformer phase and of the decode in this call.

    Per-call peaks reset the process peak, so pass `overall` (a dict) to keep the running maximum
    under 'peak' across calls.
    """
    if decode is not None:
        decode.clear()
        decode.peaks = {}
        reset_peak_memory(device)
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    dec_wall, dec_cpu = decode.elapsed() if decode is not None else (0.0, 0.0)
    res = dict(out=out, wall_s=wall, cpu_s=cpu, decode_wall_s=dec_wall, decode_cpu_s=dec_cpu)
    if decode is not None:
        res.update(transformer_peak_bytes=decode.peaks.get('transformer', 0), decode_peak_bytes=decode.peaks.get('decode', 0))
        if overall is not None:
            overall['peak'] = max(overall.get('peak', 0), res['transformer_peak_bytes'], res['decode_peak_bytes'])
    return res


def profile_call(fn: Callable[[], Any], device: torch.device, top: int = 25) -> Dict[str, Any]:
    """Run fn once under torch.profiler; self time per aten op (seconds), the largest `top` first."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    ops = []
    for e in prof.key_averages():
        dev_us = getattr(e, 'self_device_time_total', 0) or 0
        ops.append((e.key, e.self_cpu_time_total / 1e6, dev_us / 1e6, e.count))
    ops.sort(key=lambda o: -(o[2] if device.type == 'cuda' else o[1]))
    total = sum(o[1] for o in ops)
    return dict(total_self_cpu_s=total, ops=[dict(name=n, self_cpu_s=c, self_device_s=d, calls=k) for n, c, d, k in ops[:top]])


def digest(t: torch.Tensor) -> str:
    """Short hash of a tensor's float32 bytes: equal digests mean bit-identical outputs."""
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def train_step_row(var, vae, forward: Callable, V: int, batch: int, num_classes: int, patch_nums, steps: int,
                   warmup: int, bf16: bool, device: str) -> Dict[str, Any]:
    """Median ms of one AdamW step (forward, cross-entropy, backward, step) on random tokens, the MiB autograd saves
    for backward (parameters excluded) and on CUDA the peak allocated MiB; forward(label_B, x_BLCv) -> logits_BLV.
    Takes the official models as well as ours."""
    device = torch.device(device)
    var.to(device).train()
    vae.to(device)
    g = torch.Generator().manual_seed(0)
    idx_Bl = [torch.randint(0, V, (batch, p * p), generator=g).to(device) for p in patch_nums]
    x_BLCv, gt_BL = vae.quantize.idxBl_to_var_input(idx_Bl), torch.cat(idx_Bl, 1)
    label_B = torch.arange(batch, device=device) % num_classes
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95))
    act = memory.saved_activation_bytes(lambda: forward(label_B, x_BLCv), var.parameters())
    reset_peak_memory(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits_BLV = forward(label_B, x_BLCv)
        torch.nn.functional.cross_entropy(logits_BLV.float().reshape(-1, V), gt_BL.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None
    return dict(params_m=sum(p.numel() for p in var.parameters()) / 1e6, step_ms=1000 * statistics.median(times),
                saved_act_mib=act / 2 ** 20, peak_mib=peak)


def sampling_handlers(setup: Callable[[Dict[str, Any]], Dict[str, Any]], st: Dict[str, Any],
                      describe: Callable[[Any], tuple]) -> Dict[str, Callable]:
    """`serve` handlers for a sampling child: `setup(msg)` fills `st` with device, call, decode (a DecodeTimer)
    and overall ({}); `describe(out)` turns the call's output into (images, KV-cache bytes, iterations or None).
    run = one timed call, memory = the peak (and the FLOPs) of one more call, profile = per-op self times of
    one call."""

    def run(msg):
        r = timed_call(st['call'], st['device'], st['decode'], st['overall'])
        img, kv_cache_bytes, iters = describe(r.pop('out'))
        r.update(digest=digest(img), kv_cache_bytes=kv_cache_bytes, iters=iters)
        return r

    def memory(msg):   # the FLOPs of the same call are counted on the way (the counter allocates nothing)
        box = {}
        probe = memory_probe(counting_flops(st['call'], box), st['device'], st['decode'], st['overall'])
        return dict(peak_so_far(st["device"], st["overall"]), probe=probe, flops=box.get('flops', 0))

    def profile(msg):
        return profile_call(st['call'], st['device'])

    return dict(setup=setup, run=run, memory=memory, profile=profile)


# ---------------------------------------------------------------- child-process protocol

def serve(handlers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]]) -> None:
    """Answer JSON commands from stdin until 'quit'; handlers map a command name to a function of the message.

    Replies go to a duplicate of the original stdout; fd 1 is pointed at stderr so stray prints
    (the official constructor prints) cannot corrupt the protocol. An exception becomes an
    {'error': ...} reply and ends the child.
    """
    proto = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get('cmd')
        if cmd == 'quit':
            break
        try:
            reply = handlers[cmd](msg)
        except Exception as e:   # reported to the parent, which prints it with the child's stderr
            import traceback
            traceback.print_exc()
            proto.write(json.dumps({'error': f'{type(e).__name__}: {e}'}) + '\n')
            break
        proto.write(json.dumps(reply) + '\n')
    proto.close()


def check_official(path: str) -> None:
    """SystemExit unless `path` (an --official flag) is a checkout of the official code."""
    if not os.path.isdir(os.path.join(path, 'models')):
        raise SystemExit(f'--official {path}: not a checkout of the official VIAR code (no models/ folder there)')


def official_child(path: str, name: str = 'official', env: Optional[Dict[str, str]] = None, cwd: str = ROOT):
    """A Child running bench/official_runner.py on the official checkout at `path`."""
    return Child([sys.executable, os.path.join(ROOT, 'bench', 'official_runner.py'), os.path.abspath(path)], name,
                 env=env, cwd=cwd)


class Child:
    """Parent side of one child process speaking the `serve` protocol."""

    def __init__(self, argv, name: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
        import subprocess
        import tempfile
        self.name = name
        self.log = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env, cwd=cwd)

    def ask(self, **msg) -> Dict[str, Any]:
        """Send one command and wait for its reply; a dead child or an error reply raises with its log."""
        try:
            self.proc.stdin.write(json.dumps(msg) + '\n')
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ''
        reply = json.loads(line) if line.strip() else {'error': 'child exited without replying'}
        if 'error' in reply:
            raise RuntimeError(f'{self.name} child failed: {reply["error"]}\n--- its stderr (tail) ---\n{self.stderr_tail()}')
        return reply

    def stderr_tail(self, n: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]

    def close(self):
        """Ask the child to quit and reap it."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
