"""What a first GPU run would trip over, shown on the CPU: meta tensors stand in for CUDA ones, a Dynamo backend
emulates CUDA graph trees, spies watch the TF32 settings and the host reads of a training step."""
import dataclasses
import threading
import warnings

import pytest
import torch
import torch._dynamo

from models import schedules as S
from models.solver import anderson_iterate, fixed_point_iterate
from tests.conftest import needs_c_compiler
from tests.tiny import tiny_spec, tiny_vae_var
from utils.sample.compile_util import (CUDAGRAPH_MODES, SamplingError, compile_mode, prepare_for_sampling,
                                       sampling_tf32)
from utils.train import init_ckpt as ic


# ---------------------------------------------------------------- fine-tuning onto a model on another device

def test_class_rows_read_on_the_cpu_join_a_model_on_another_device():
    """The file's rows are on the CPU (read_checkpoint maps there), the model's on the GPU: 'meta' stands in."""
    file_NC = torch.randn(6, 8)
    out = ic.adapt_class_emb(file_NC, torch.empty(4, 8, device='meta', dtype=torch.float16))
    assert out.device.type == 'meta' and out.shape == (4, 8) and out.dtype == torch.float16


@pytest.mark.parametrize('from_var', [False, True])
def test_init_with_another_class_count_loads_into_a_model_on_another_device(from_var):
    """--init_ckpt / --init_from_var with 5 classes in the file and 3 in the run, the run's model on 'meta'."""
    _, src = tiny_vae_var(not from_var, num_classes=5)
    _, var = tiny_vae_var(True, num_classes=3)
    var.to('meta')
    spec = dataclasses.replace(tiny_spec(True), num_classes=3)
    load = ic.load_init_from_var if from_var else ic.load_init_ckpt
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # copying into a meta parameter is a no-op, and torch says so per tensor
        done = load(var, spec, src.state_dict(), 'file.pth', lambda line: None)
    assert 'class_emb' in done and var.class_emb.weight.device.type == 'meta' and var.class_emb.weight.shape == (4, 32)


# ---------------------------------------------------------------- --compile: no CUDA graphs for chained modules

def test_compile_mode_never_replays_cuda_graphs_on_cuda():
    assert compile_mode('cuda', None) not in CUDAGRAPH_MODES and compile_mode('cpu', None) is None
    assert compile_mode('cuda', 'max-autotune-no-cudagraphs') == 'max-autotune-no-cudagraphs'
    for mode in CUDAGRAPH_MODES:
        with pytest.raises(SamplingError, match='CUDA graphs'):
            compile_mode('cuda', mode)
        assert compile_mode('cpu', mode) == mode   # no CUDA graphs off a GPU: nothing to refuse


def test_a_scale_step_compiled_whole_may_replay_cuda_graphs():
    for mode in CUDAGRAPH_MODES:
        assert compile_mode('cuda', mode, scope='scale') == mode
    assert compile_mode('cuda', None, scope='scale') in CUDAGRAPH_MODES and compile_mode('cpu', None, 'scale') is None
    with pytest.raises(SamplingError, match='compile scope must be one of modules, scale'):
        compile_mode('cpu', None, scope='graphs')


class CudaGraphTreeEmulator:
    """A Dynamo backend that runs each graph as it is and, for a mode that replays CUDA graphs, treats outputs as
    CUDA graph trees do in inference: every call of any compiled graph starts a new generation and frees the
    outputs of the call before. A freed output passed into a call is recorded in `stale_inputs`; every freed
    float output is overwritten with NaN, so a read after the next call shows in what the sampler returns."""

    def __init__(self):
        self.live, self.stale_inputs = [], 0

    def __call__(self, gm, example_inputs, mode=None, **kw):
        if mode not in CUDAGRAPH_MODES:
            return gm.forward

        def run(*args):
            dead, self.live = self.live, []
            dead_ptrs = {t.untyped_storage().data_ptr() for t in dead}
            arg_ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self.stale_inputs += len(dead_ptrs & arg_ptrs)
            for t in dead:
                t.fill_(float('nan'))
            out = gm.forward(*args)
            self.live = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()
                         and t.untyped_storage().data_ptr() not in arg_ptrs]   # outputs aliasing inputs are not freed
            return out
        return run


def _sample_watched(sampler, var, kw):
    """Images, final residuals, and every iterate the hooks saw (z_t and G(z_t), read in the hook)."""
    seen = []
    handle = var.register_iterate_hook(lambda z, z_next: seen.extend((z.float().sum().item(),
                                                                      z_next.float().sum().item())))
    try:
        img, stats = sampler(2, torch.tensor([0, 3]), return_stats=True, **kw)
    finally:
        handle.remove()
    return img, [float(r) for r in stats.residuals], seen


KW = dict(g_seed=3, cfg=1.5, top_k=1, schedule=S.explicit([2, 3, 1, 2], 4))


@pytest.mark.slow
def test_cuda_graph_trees_would_free_what_the_scale_loop_reads_next():
    """With CUDA-graph semantics, the chained blocks pass freed outputs on, and the solver's residual and the
    iterate hooks read freed iterates: the emulator sees it. So the rule below must never pick such a mode."""
    _, var = tiny_vae_var(True)
    want = _sample_watched(prepare_for_sampling(var), var, KW)
    torch._dynamo.reset()
    emu = CudaGraphTreeEmulator()
    sampler = prepare_for_sampling(var, compile=True, backend=emu, mode='reduce-overhead', compile_vae=False)
    with pytest.raises(RuntimeError, match='probability tensor contains either `inf`, `nan`'):
        _sample_watched(sampler, var, KW)   # the first scale's logits come from freed (NaN) tensors
    assert emu.stale_inputs > 0


@pytest.mark.slow
@pytest.mark.parametrize('use_implicit', [False, True])
def test_a_scale_step_captured_whole_reads_nothing_cuda_graphs_free(use_implicit):
    """Scope 'scale' in a CUDA-graph mode, through the emulator: one graph per scale and no graph break, nothing
    freed is read (the next scale's input comes from eager code, the residuals are copied out), and the images and
    stats are the eager ones, on two calls (the second replays)."""
    from torch._dynamo.utils import counters   # torch._dynamo only for this count: heavy to import
    _, var = tiny_vae_var(use_implicit)
    kw = dict(KW, return_stats=True, fill_forward=False)
    want, want_st = prepare_for_sampling(var)(2, torch.tensor([0, 3]), **kw)
    torch._dynamo.reset()
    counters.clear()
    emu = CudaGraphTreeEmulator()
    sampler = prepare_for_sampling(var, compile=True, backend=emu, mode=compile_mode('cuda', None, 'scale'),
                                   compile_vae=False, scope='scale')
    for _ in range(2):
        got, st = sampler(2, torch.tensor([0, 3]), **kw)
        assert emu.stale_inputs == 0
        assert torch.equal(got, want)   # the graphs run as traced: the eager arithmetic, bit for bit
        assert st.iters == want_st.iters and st.residuals == want_st.residuals
    assert counters['stats']['unique_graphs'] == len(var.patch_nums) and not counters['graph_break']


class Halve(torch.nn.Module):
    def forward(self, z):
        return 0.5 * z + 1


@pytest.mark.parametrize('mode,readable', [('reduce-overhead', False), (compile_mode('cuda', None), True)])
def test_the_emulator_catches_a_read_of_the_previous_iterate(mode, readable):
    """The plain solver reads z_t after calling G(z_t) (its residual); under CUDA-graph semantics that read finds
    a freed tensor. One compiled module, so nothing but the solver's own reads is at stake."""
    torch._dynamo.reset()
    emu = CudaGraphTreeEmulator()
    G = Halve()
    G.compile(backend=emu, mode=mode)
    with torch.no_grad():
        z, st = fixed_point_iterate(lambda z, t: G(z), torch.zeros(3), 4)
    assert bool(torch.isfinite(st.residual)) == readable and (emu.stale_inputs == 0) == readable
    if readable:
        assert torch.equal(z, torch.full((3,), 1.875))


@pytest.mark.slow
def test_compiled_sampling_in_the_mode_cuda_gets_reads_nothing_freed():
    """The sampler compiled in the mode the rule gives CUDA, through the same backend: nothing is freed, and the
    images, residuals and hooked iterates are the eager ones."""
    _, var = tiny_vae_var(True)
    want = _sample_watched(prepare_for_sampling(var), var, KW)
    torch._dynamo.reset()
    emu = CudaGraphTreeEmulator()
    sampler = prepare_for_sampling(var, compile=True, backend=emu, mode=compile_mode('cuda', None), compile_vae=False)
    got = _sample_watched(sampler, var, KW)
    assert emu.stale_inputs == 0
    torch.testing.assert_close(got[0], want[0])
    assert got[1] == pytest.approx(want[1], rel=1e-5) and got[2] == pytest.approx(want[2], rel=1e-5)


# ---------------------------------------------------------------- the web app: compiled, requests from worker threads

def test_the_app_asks_for_no_cuda_graphs(monkeypatch):
    """The server's --compile goes through compile_mode's rule: on CUDA that is a mode without CUDA graphs, whose
    set-up asserts on thread-local state in Gradio's worker threads."""
    from utils.app import loading
    from utils.model_io import Loaded
    from utils.sample.config import SampleConfig
    seen = {}
    real = loading.prepare_for_sampling
    monkeypatch.setattr(loading, 'prepare_for_sampling', lambda var, **kw: seen.update(kw) or real(var, **kw))
    loading.serve_model('VIAR', Loaded(*tiny_vae_var(True), None, 'tiny'), SampleConfig(compile=True))
    assert seen['compile'] and compile_mode('cuda', seen.get('mode')) not in CUDAGRAPH_MODES


@pytest.mark.slow
@needs_c_compiler
def test_a_compiled_app_model_answers_its_first_request_from_a_worker_thread():
    """Inductor, as app.py --compile: the first request (which compiles) runs in a thread, as Gradio runs it, and
    gives the eager model's images."""
    from utils.app import loading, requests
    from utils.model_io import Loaded
    from utils.sample.config import SampleConfig
    torch._dynamo.reset()
    eager = loading.serve_model('VIAR', Loaded(*tiny_vae_var(True), None, 'tiny'), SampleConfig())
    compiled = loading.serve_model('VIAR', Loaded(*tiny_vae_var(True), None, 'tiny'), SampleConfig(compile=True))
    config = requests.sample_config(1.5, 1, 0, requests.ScheduleRequest(requests.CONDEC, 3, 2), 4)   # greedy
    answer = {}

    def handler():
        try:
            answer['result'] = requests.generate(compiled, 1, '0-3', config, batch_size=4)
        except BaseException as e:   # reported below, in the test's thread
            answer['error'] = e
    worker = threading.Thread(target=handler)
    worker.start()
    worker.join()
    assert 'error' not in answer, answer.get('error')
    want = requests.generate(eager, 1, '0-3', config, batch_size=4)
    assert answer['result'].iters == want.iters
    torch.testing.assert_close(answer['result'].images_N3HW, want.images_N3HW, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Anderson under fp16 / bf16 autocast

def slow_map(scale: float = 300.0, lam: float = 0.97, R: int = 2, N: int = 16384, k: int = 4):
    """(G, x): G(z) = x + 0.5 s d * tanh(z / s) + lam z U U^T, a contraction with k slow directions (U) whose plain
    iteration needs ~70 steps to 3e-3. Under autocast its matmuls, and so its output, are in the autocast dtype.
    At s = 300 the residuals stay large enough that an fp16 Gram matrix (R rows of N) overflows."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g))
    d = torch.rand(N, generator=g) * 2 - 1
    x = scale * torch.randn(R, N, generator=g)

    def G(z, t):
        h_RN = (z @ U) @ (lam * U.T)
        z = z.to(h_RN.dtype)
        return x.to(h_RN.dtype) + 0.5 * scale * d.to(h_RN.dtype) * torch.tanh(z / scale) + h_RN
    return G, x


@pytest.mark.parametrize('dtype,tau', [(torch.float16, 3e-3), (torch.bfloat16, 1e-2)])
def test_anderson_keeps_its_acceleration_under_autocast(dtype, tau):
    """Under the sampler's autocast, Anderson reaches tau in no more iterations than the plain iteration, and
    within two of what it needs in float32 (its mixing runs in float32 whatever the autocast)."""
    G, x = slow_map()
    with torch.no_grad():
        _, acc32 = anderson_iterate(G, x, 100, tau=tau)
        with torch.autocast('cpu', dtype=dtype):
            _, plain = fixed_point_iterate(G, x, 100, tau=tau)
            _, acc = anderson_iterate(G, x, 100, tau=tau)
    assert plain.iters < 100 and acc.iters <= plain.iters and acc.iters <= acc32.iters + 2, \
        (plain.iters, acc.iters, acc32.iters)


# ---------------------------------------------------------------- train.py --compile: graphs that ignore (n, m)

class CountingBackend:
    """A Dynamo backend that counts the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kw):
        self.graphs += 1
        return gm.forward


def _train_steps(compile_fn, steps: int = 20, after_step=lambda: None):
    """Losses and S-JFB plans of `steps` VIAR training steps (n in 0..10, m in 1..12, drawn per step)."""
    from trainer import VARTrainer
    from utils.train.amp_opt import AmpOptimizer, build_adamw
    from utils.train.lr_control import param_groups
    vae, var = tiny_vae_var(True, jfb_no_grad=(0, 10), jfb_with_grad=(1, 12))
    var.train()
    _, params, groups = param_groups(var)
    tr = VARTrainer(vae, var, compile_fn(var), AmpOptimizer(build_adamw(groups, 1e-3, torch.device('cpu')), params))
    g = torch.Generator().manual_seed(0)
    losses, plans = [], []
    for step in range(steps):
        img, label = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 5, (4,), generator=g)
        st = tr.train_step(img, label, g_it=step, stepping=True)
        losses.append(st.loss)
        plans.append((st.n, st.m))
        after_step()
    return losses, plans


@pytest.mark.slow
def test_training_compile_does_not_recompile_for_each_sjfb_pair():
    """20 steps of 18 distinct (n, m): every graph exists after the first steps, and the losses are the eager ones
    (a compiled whole forward recompiled at each new pair and, from the ninth, hit Dynamo's recompile limit)."""
    import train
    want, plans = _train_steps(lambda var: var)
    torch._dynamo.reset()
    backend, counts = CountingBackend(), []
    got, _ = _train_steps(lambda var: train.compile_for_training(var, backend=backend),
                          after_step=lambda: counts.append(backend.graphs))
    assert len(set(plans)) >= 15
    assert 0 < counts[-1] <= 6 and counts[1] == counts[-1], counts
    assert got == want


# ---------------------------------------------------------------- TF32: one setting for tokens, --dtype fp32 is fp32

@pytest.fixture
def tf32_on():
    """TF32 on, as train.py --tf32 1 sets it; the defaults back afterwards."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def _precision():
    """The float32 precision CUDA matmuls and convolutions would run in: each setting's own value, else ('none')
    its parent's (the legacy allow_tf32 writes set some at the parent)."""
    b = torch.backends

    def first(*values):
        return next((v for v in values if v != 'none'), 'ieee')
    return (first(b.cuda.matmul.fp32_precision, b.fp32_precision),
            first(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision))


def test_tokens_are_computed_without_tf32_on_the_fly_and_for_the_cache(tf32_on, monkeypatch):
    """train.py's on-the-fly tokens and scripts/extract_tokens.py's cached ones both come from full-float32
    matmuls and convolutions, whatever TF32 setting the caller made; the caller's setting is back afterwards."""
    import importlib
    from trainer import VARTrainer
    extract = importlib.import_module('scripts.extract_tokens')
    vae, var = tiny_vae_var(True)
    seen = []
    real = vae.img_to_idxBl
    monkeypatch.setattr(vae, 'img_to_idxBl', lambda *a, **k: seen.append(_precision()) or real(*a, **k))
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    VARTrainer(vae, var, var, opt=None).tokenize(img)
    views = [(img[i:i + 1], i) for i in range(2)]   # (W = 1 view, label) per image
    extract.encode_shard(vae, views, 0, 2, batch_size=2, workers=0, device=torch.device('cpu'))
    assert seen == [('ieee', 'ieee')] * 2
    assert _precision() == ('tf32', 'tf32')


@pytest.mark.parametrize('dtype,tf32', [('fp32', False), ('auto', False), ('bf16', True)])
def test_gen_img_turns_tf32_on_only_with_16_bit_autocast(tf32_on, tmp_path, dtype, tf32):
    """--dtype fp32 (and 'auto' off CUDA, which is fp32) leaves TF32 off, whatever was set before; bf16/fp16 turn it
    on (the official script's setting). CUDA's settings are written on a CPU run too, where they do nothing."""
    import gen_img
    from tests.tiny import write_tiny_export
    ckpt = write_tiny_export(tmp_path / 'tiny.pth')
    gen_img.main(['--var_ckpt', ckpt, '--vae_ckpt', '', '--device', 'cpu', '--output_dir', str(tmp_path / 'out'),
                  '--class_label', '1', '--seeds', '0', '--iter_left', '2', '--iter_right', '2', '--top_k', '0',
                  '--top_p', '0', '--progress', 'False', '--dtype', dtype])
    assert _precision() == (('tf32', 'tf32') if tf32 else ('ieee', 'ieee'))
    assert [sampling_tf32(d) for d in ('fp32', 'bf16', 'fp16')] == [False, True, True]


# ---------------------------------------------------------------- a training step queues its backward before any host read

HOST_READS = ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__')


def _tiny_trainer(**kw):
    from trainer import VARTrainer
    from utils.train.amp_opt import AmpOptimizer, build_adamw
    from utils.train.lr_control import param_groups
    vae, var = tiny_vae_var(True)
    var.train()
    _, params, groups = param_groups(var)
    return VARTrainer(vae, var, var, AmpOptimizer(build_adamw(groups, 1e-2, torch.device('cpu')), params, **kw))


def test_a_training_step_reads_nothing_back_before_its_backward(monkeypatch):
    """Every host read of a tensor (item, tolist, bool, float, int) is recorded beside the backward call: none
    comes before it, so on a GPU the host queues the backward right behind the forward."""
    tr = _tiny_trainer()
    img, label = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    events = []

    def recorded(name, real):
        return lambda *a, **k: events.append(name) or real(*a, **k)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(tr.opt, 'backward', recorded('backward', tr.opt.backward))
    st = tr.train_step(img, label, g_it=0, stepping=True)
    assert st.stepped and 'backward' in events
    assert events[:events.index('backward')] == [], events


def test_a_non_finite_loss_drops_its_window_and_updates_nothing():
    """The non-finite policy without the early read: a NaN loss on the stepping call of a window of two leaves the
    weights and the optimizer alone and drops the window's grads; a NaN loss inside a window drops the grads
    accumulated so far, and the window's finite stepping call steps on its own grads."""
    from tests.hooked_train import FaultHooks
    tr = _tiny_trainer(accum_steps=2)
    var = tr.var_wo_ddp
    img, label = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in var.state_dict().items()}
    tr.hooks = FaultHooks(nan_steps=(2,))
    st = tr.train_step(img, label, g_it=0, stepping=False)
    assert st.loss_finite and any(p.grad is not None for p in var.parameters())
    st = tr.train_step(img, label, g_it=1, stepping=True)   # step 2: poisoned
    assert not st.loss_finite and not st.stepped and st.grad_norm is None
    assert all(p.grad is None for p in var.parameters()) and not tr.opt.optimizer.state
    assert all(torch.equal(v, var.state_dict()[k]) for k, v in before.items())

    tr.hooks = FaultHooks(nan_steps=(4,))
    st = tr.train_step(img, label, g_it=2, stepping=False)
    assert st.loss_finite and any(p.grad is not None for p in var.parameters())
    st = tr.train_step(img, label, g_it=3, stepping=False)   # step 4: poisoned, inside the window
    assert not st.loss_finite and all(p.grad is None for p in var.parameters())   # step 3's grads went too
    alone = _tiny_trainer(accum_steps=2)   # the window's finite stepping call on its own
    st = tr.train_step(img, label, g_it=4, stepping=True)
    want = alone.train_step(img, label, g_it=4, stepping=True)
    assert st.loss_finite and st.stepped and st.grad_norm == pytest.approx(want.grad_norm, rel=1e-6)
    assert torch.equal(var.head.weight, alone.var_wo_ddp.head.weight)
