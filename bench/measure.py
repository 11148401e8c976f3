"""The benchmarks' shared harness: project root, machine, memory, timing, tables and child processes.

Imports nothing from the project at import time (the official runner, whose packages share our names, uses it):
its few project imports are inside the functions that need them.
"""
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project root, above bench/
SIMD_FLAGS = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_int8')   # CPU GEMM speed


def load_project_module(name: str, relpath: str):
    """A project module that imports nothing from the project, loaded from its file under a private name."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory = load_project_module('viar_project_memory', os.path.join('utils', 'memory.py'))


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """Rows under a header: a Markdown table, or (markdown=False) console columns, the first left-aligned."""
    cells = [[str(c) for c in r] for r in [head, *rows]]
    if markdown:
        lines = ['| ' + ' | '.join(r) + ' |' for r in cells]
        return '\n'.join(lines[:1] + ['|' + '---|' * len(head)] + lines[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return '\n'.join(' '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


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
    """What a benchmark JSON records beside its figures: the CPU, its SIMD_FLAGS, the load average now, torch."""
    from utils.sample.compile_util import read_cpu_flags
    flags = read_cpu_flags()
    return dict(cpu=machine_name(), flags=[f for f in SIMD_FLAGS if f in flags],
                load_avg=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__)


def machine_line() -> str:
    """machine_facts in one printed line."""
    m = machine_facts()
    return f'{m["cpu"]} ({" ".join(m["flags"])}), load {" ".join(f"{x:.1f}" for x in m["load_avg"])}'


def write_report(folder: str, name: str, result: Dict[str, Any], text: str, plot: Callable[[Dict, str], None]):
    """folder/name.json (the result), name.md (text) and name.png (plot(result, path)), each atomically."""
    from utils.atomic import atomic_path, write_json_atomic
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(result, os.path.join(folder, f'{name}.json'), indent=1)
    with atomic_path(os.path.join(folder, f'{name}.md')) as tmp, open(tmp, 'w') as f:
        f.write(text)
    with atomic_path(os.path.join(folder, f'{name}.png')) as tmp:
        plot(result, tmp)


def gemm_rate(dtype: torch.dtype, basis: str = 'wall', M: int = 1360, K: int = 768, N: int = 3072,
              reps: int = 20, onednn: bool = False) -> float:
    """Peak FLOP/s of an (M, K) @ (K, N) matmul in `dtype` (default: a 256 px scale's FFN input at width 768), best
    of `reps` after two warm-ups; basis 'cpu': process CPU time (load-proof) times the threads, 'wall': the clock.
    onednn: oneDNN's Linear kernel (what the fast sampler's blocks call on a CPU) instead of torch.mm."""
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    w = b.t().contiguous() if onednn else None   # oneDNN's layout: (out, in)
    clock = time.process_time if basis == 'cpu' else time.perf_counter
    best = float('inf')
    for i in range(reps + 2):
        t0 = clock()
        torch.ops.mkldnn._linear_pointwise(a, w, None, 'none', [], '') if onednn else torch.mm(a, b)
        if i >= 2:
            best = min(best, clock() - t0)
    return 2 * M * K * N / best * (torch.get_num_threads() if basis == 'cpu' else 1)


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA allocator stats on a GPU, VmHWM on CPU)."""
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    memory.reset_peak_rss()


class TimedCall:
    """A sampling call, timed: wall and CPU seconds of the call and of its VQVAE decode (post_quant_conv's input to
    the decoder's output, in ours and the official code alike), the peak memory of each phase; `peak`: the max."""

    def __init__(self, call: Callable[[], Any], vae: torch.nn.Module, device: torch.device):
        self.call, self.device, self.peak, self.start, self.end, self.peaks = call, device, 0, None, None, {}
        vae.post_quant_conv.register_forward_pre_hook(self._on_start)
        vae.decoder.register_forward_hook(self._on_end)

    def _on_start(self, module, args):
        sync(self.device)
        self.peaks['transformer'] = memory.peak_memory(self.device)['bytes']
        reset_peak_memory(self.device)
        self.start = (time.perf_counter(), time.process_time())

    def _on_end(self, module, args, output):
        sync(self.device)
        self.end = (time.perf_counter(), time.process_time())
        self.peaks['decode'] = memory.peak_memory(self.device)['bytes']

    def run(self, fn: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
        """One call (or fn, which makes it): its output, seconds and phase peaks."""
        self.start, self.end, self.peaks = None, None, {}
        reset_peak_memory(self.device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = (fn or self.call)()
        sync(self.device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        dec = [e - s for e, s in zip(self.end, self.start)] if self.start and self.end else (0, 0)
        tr_peak, dec_peak = self.peaks.get('transformer', 0), self.peaks.get('decode', 0)
        self.peak = max(self.peak, tr_peak, dec_peak)
        return dict(out=out, wall_s=wall, cpu_s=cpu, decode_wall_s=dec[0], decode_cpu_s=dec[1],
                    transformer_peak_bytes=tr_peak, decode_peak_bytes=dec_peak)

    def memory(self) -> Dict[str, Any]:
        """One more call for memory and FLOPs: the bytes before it (RSS once freed memory is released, or CUDA
        allocated), its phases' peaks, the process peak so far, its FLOPs (FlopCounterMode; 0 if it cannot count)."""
        sync(self.device)
        cuda = self.device.type == 'cuda'
        if not cuda:
            memory.release_freed_memory()
        base = int(torch.cuda.memory_allocated(self.device)) if cuda else memory.current_rss_bytes()
        box = {}

        def counted():
            try:
                with FlopCounterMode(display=False, custom_mapping=uncounted_flop_formulas()) as counter:
                    out = self.call()
                box['flops'] = int(counter.get_total_flops())
                return out
            except Exception:   # a compiled graph under a dispatch mode: run it uncounted
                return self.call()
        r = self.run(counted)
        tr, dec = r['transformer_peak_bytes'], r['decode_peak_bytes']
        probe = dict(base_bytes=base, transformer_peak_bytes=tr, decode_peak_bytes=dec, peak_bytes=max(tr, dec))
        peaks = dict(peak_rss_bytes=memory.peak_rss_bytes() if cuda else max(self.peak, memory.peak_rss_bytes()))
        if cuda:
            peaks['cuda_max_allocated_bytes'] = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
        return dict(peaks, probe=probe, flops=box.get('flops', 0))


def uncounted_flop_formulas() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for ops torch's FlopCounterMode counts as 0 (custom_mapping): CPU flash attention (both sides
    sample with it) and oneDNN's fused Linear + GELU (the fast path's fc1 in bf16). Without them a call's bound
    leaves out its attention, and the fast path's bound its fc1 too."""

    def attention(q_shape, k_shape, v_shape, *args, **kw) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def linear_pointwise(x_shape, w_shape, *args, **kw) -> int:   # x (..., in), w (out, in)
        return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]
    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention}
    if hasattr(torch.ops.mkldnn, '_linear_pointwise'):   # builds without oneDNN have no such op
        formulas[torch.ops.mkldnn._linear_pointwise] = linear_pointwise
    return formulas


def profile_call(fn: Callable[[], Any], device: torch.device, top: int = 25) -> Dict[str, Any]:
    """Run fn once under torch.profiler; self time per aten op (seconds), the largest `top` first."""
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])) as p:
        fn()
        sync(device)
    ops = [dict(name=e.key, self_cpu_s=e.self_cpu_time_total / 1e6, calls=e.count,
                self_device_s=(getattr(e, 'self_device_time_total', 0) or 0) / 1e6) for e in p.key_averages()]
    ops.sort(key=lambda o: -o['self_device_s' if device.type == 'cuda' else 'self_cpu_s'])
    return dict(total_self_cpu_s=sum(o['self_cpu_s'] for o in ops), ops=ops[:top])


def digest(t: torch.Tensor) -> str:
    """Short hash of a tensor's float32 bytes: equal digests mean bit-identical outputs."""
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def train_step_row(var, vae, forward: Callable, V: int, batch: int, num_classes: int, patch_nums, steps: int,
                   warmup: int, bf16: bool, device: str) -> Dict[str, Any]:
    """Median ms of an AdamW step on random tokens, the MiB autograd saves (parameters excluded), the CUDA peak MiB;
    forward(label_B, x_BLCv) -> logits_BLV, so the official models fit as well."""
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


def sampling_handlers(build: Callable[[Dict[str, Any]], tuple], describe: Callable[[Any], tuple]):
    """`serve` handlers of a sampling child: build(msg) -> (device, vae, call); describe(out) -> (images,
    KV-cache bytes, iterations or None). msg['threads'], when set, is the child's torch threads."""
    st = {}

    def setup(msg):
        if msg['threads']:
            torch.set_num_threads(int(msg['threads']))
        device, vae, call = build(msg)
        st['timed'] = TimedCall(call, vae, device)
        rss = memory.current_rss_bytes()
        reset_peak_memory(device)
        return {'ok': True, 'rss_after_build_bytes': rss}

    def run(msg):
        r = st['timed'].run()
        img, kv_cache_bytes, iters = describe(r.pop('out'))
        return dict(r, digest=digest(img), kv_cache_bytes=kv_cache_bytes, iters=iters)

    return dict(setup=setup, run=run, memory=lambda msg: st['timed'].memory(),
                profile=lambda msg: profile_call(st['timed'].call, st['timed'].device))


def serve(handlers: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]]) -> None:
    """A child's loop: handlers[msg['cmd']](msg) answers each JSON line of stdin with one, until 'quit'. Replies go
    to a copy of stdout and fd 1 to stderr, so stray prints cannot corrupt them; an exception ends the child."""
    proto = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get('cmd') == 'quit':
            break
        try:
            reply = handlers[msg.get('cmd')](msg)
        except Exception as e:   # reported to the parent, which prints it with the child's stderr
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
    check_official(path)
    return Child([sys.executable, os.path.join(ROOT, 'bench', 'official_runner.py'), os.path.abspath(path)], name,
                 env=env, cwd=cwd)


class Child:
    """Parent side of one child process speaking the `serve` protocol."""

    def __init__(self, argv, name: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
        self.name, self.log = name, tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env, cwd=cwd)

    def ask(self, **msg) -> Dict[str, Any]:
        """One command's reply; a dead child or an error reply raises with its stderr's tail."""
        try:
            self.proc.stdin.write(json.dumps(msg) + '\n')
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ''
        reply = json.loads(line) if line.strip() else {'error': 'child exited without replying'}
        if 'error' in reply:
            self.log.seek(0)
            raise RuntimeError(f'{self.name} child failed: {reply["error"]}\n--- its stderr (tail) ---\n'
                               f'{self.log.read()[-4000:]}')
        return reply

    def close(self):
        """Ask the child to quit and reap it (killed after a minute)."""
        if self.proc.poll() is None:
            try:
                self.proc.communicate(json.dumps({'cmd': 'quit'}) + '\n', timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()
