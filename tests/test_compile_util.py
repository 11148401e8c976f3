"""utils/sample/compile_util.py: the eager fp32 sampler is the model's own sampler; compiled and autocast samplers
agree with it; the fast path (`prepare_for_sampling(fast=True)`) is the same maths with other rounding."""
import json
import os

import pytest
import torch

from models import schedules as S
from models.blocks import onednn_dense
from models.solver import SolverSpec
from models.var import EditSpec
from tests.conftest import needs_c_compiler
from tests.tiny import OpNames, tiny_tokens, tiny_vae_var
from utils.sample.compile_util import (RESIDUAL_FLOOR, SamplingError, cpu_flags, fast_dtype, native_bf16,
                                       prepare_for_sampling, resolve_dtype)
from utils.sample.config import SampleConfig

KW = dict(g_seed=3, cfg=1.5, top_k=1)   # greedy, so small float differences cannot flip a token


def _sample_with_tokens(fn, var, vae, B=2, **kw):
    """Images and the token maps sampled at every scale (recorded at the VQVAE embedding lookup)."""
    toks = []
    h = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
    try:
        out = fn(B, torch.tensor([0, 3]), **kw)
    finally:
        h.remove()
    return out, toks


def test_eager_fp32_sampler_is_bit_identical_to_the_model():
    vae, var = tiny_vae_var(True)
    kw = dict(KW, schedule=S.explicit([2, 3, 1, 2], 4), return_stats=True)
    (ref, st_ref), _ = _sample_with_tokens(var.autoregressive_infer_cfg, var, vae, **kw)
    sampler = prepare_for_sampling(var, compile=False, dtype='fp32')
    (out, st), _ = _sample_with_tokens(sampler, var, vae, **kw)
    assert torch.equal(out, ref) and st.iters == st_ref.iters
    assert not sampler.compiled and sampler.mode is None


def test_bad_dtype_is_a_clear_error():
    _, var = tiny_vae_var(False)
    with pytest.raises(SamplingError, match='dtype'):
        prepare_for_sampling(var, dtype='fp8')
    assert prepare_for_sampling(var, dtype='auto').dtype == 'fp32'   # CPU: auto is fp32 (fp16 on CUDA)


def test_compile_targets_cover_the_scale_loop():
    _, viar = tiny_vae_var(True)
    names = {type(m).__name__ for m in viar.scale_loop_modules()}
    assert names == {'AdaLNSelfAttn', 'AdaLNBeforeHead', 'Sequential'}
    assert len([m for m in viar.scale_loop_modules() if type(m).__name__ == 'AdaLNSelfAttn']) == len(viar.backbone_blocks())


def _compiled_matches_eager(use_implicit: bool, backend: str, compile_vae: bool = True):
    vae, var = tiny_vae_var(use_implicit)
    kw = dict(KW, schedule=S.explicit([2, 3, 1, 2], 4))
    ref, ref_toks = _sample_with_tokens(prepare_for_sampling(var), var, vae, **kw)
    sampler = prepare_for_sampling(var, compile=True, backend=backend, compile_vae=compile_vae)
    out, toks = _sample_with_tokens(sampler, var, vae, **kw)
    assert sampler.compiled
    assert all(torch.equal(a, b) for a, b in zip(toks, ref_toks))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out2, _ = _sample_with_tokens(sampler, var, vae, **kw)   # second call reuses the compiled graphs
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.slow
@needs_c_compiler
def test_compiled_viar_sampling_matches_eager_inductor():
    _compiled_matches_eager(True, 'inductor')


@pytest.mark.slow
def test_compiled_var_sampling_matches_eager_graph_capture():
    _compiled_matches_eager(False, 'aot_eager', compile_vae=False)   # the decoder is covered above


PN = (1, 2, 3, 4, 6, 8)   # 130 tokens per image: enough positions for a 99% agreement to mean something


B = 4


CPUINFO_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512vl avx512_vnni avx512_bf16 vaes
bugs\t\t: sysret_ss_attrs
"""


CPUINFO_AMX = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"


CPUINFO_AVX2 = "model name\t: Intel Core\nflags\t\t: fpu sse2 avx avx2 fma\n"


CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 bf16\n"


def test_cpu_flags_and_native_bf16_from_cpuinfo_text():
    assert {'avx512_bf16', 'avx2'} <= cpu_flags(CPUINFO_BF16) and 'sysret_ss_attrs' not in cpu_flags(CPUINFO_BF16)
    assert native_bf16(cpu_flags(CPUINFO_BF16)) and native_bf16(cpu_flags(CPUINFO_AMX))
    assert not native_bf16(cpu_flags(CPUINFO_AVX2)) and not native_bf16(cpu_flags(CPUINFO_ARM))
    assert cpu_flags('') == frozenset() and not native_bf16(cpu_flags('model name: x\n'))
    # an ISA cap below the bf16 instructions (emulating an AVX2-only machine) means no native bf16
    assert not native_bf16(cpu_flags(CPUINFO_BF16), 'AVX2') and not native_bf16(cpu_flags(CPUINFO_AMX), 'avx512_core')
    assert native_bf16(cpu_flags(CPUINFO_BF16), 'AVX512_CORE_BF16') and native_bf16(cpu_flags(CPUINFO_AMX), 'ALL')


def test_fast_dtype_by_device_and_cpu():
    assert fast_dtype('cpu', cpu_flags(CPUINFO_BF16)) == 'bf16'
    assert fast_dtype('cpu', cpu_flags(CPUINFO_AVX2)) == 'fp32'
    assert fast_dtype('cpu', cpu_flags(CPUINFO_BF16), 'AVX2') == 'fp32'
    assert fast_dtype('cuda', cpu_flags(CPUINFO_AVX2)) == 'fp16'   # as the official sampling
    _, var = tiny_vae_var(True)
    assert prepare_for_sampling(var, dtype='auto', fast=True).dtype == fast_dtype('cpu')   # this machine's rule
    assert prepare_for_sampling(var, dtype='auto').dtype == 'fp32'                          # exact: unchanged
    s = prepare_for_sampling(var, dtype='fp32', fast=True)
    assert s.fast and s.dtype == 'fp32' and 'fast=True' in repr(s)


def test_fast_picks_its_dtype_unless_one_is_asked():
    """prepare_for_sampling(fast=True) without a dtype resolves 'auto' as --fast does; fp32 when asked; without
    fast the default stays fp32, the official numbers."""
    _, var = tiny_vae_var(True)
    assert prepare_for_sampling(var, fast=True).dtype == resolve_dtype('cpu', 'auto', fast=True) == fast_dtype('cpu')
    assert prepare_for_sampling(var, fast=True, dtype='fp32').dtype == 'fp32'
    assert prepare_for_sampling(var).dtype == 'fp32'


def test_injection_uses_views_of_the_one_weight_and_changes_no_parameter():
    _, var = tiny_vae_var(True)
    before = {k: v.clone() for k, v in var.state_dict().items()}
    W = var.implicit_block_projection[0].weight
    x = torch.randn(2, 3, var.C)
    inj, W_z = var.injection(x)
    assert W_z._base is W and W_z.data_ptr() == W.data_ptr() and W_z.shape == (2 * var.C, var.C)
    z = torch.randn(2, 3, var.C)
    full = var.implicit_block_projection[0](torch.cat((z, x), -1))
    torch.testing.assert_close(z @ W_z.T + inj, full, rtol=1e-5, atol=1e-6)
    var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.constant(2, 4), fast=True)
    after = var.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_fast_decoder_runs_channels_last_and_the_exact_sampler_restores_the_official_layout():
    _, var = tiny_vae_var(True)
    kw = dict(g_seed=3, cfg=1.5, top_k=1, schedule=S.constant(2, 4))
    ref = var.autoregressive_infer_cfg(2, 1, **kw)
    conv_w = var.vae_proxy[0].decoder.conv_in.weight
    fast = prepare_for_sampling(var, dtype='fp32', fast=True)(2, 1, **kw)
    assert conv_w.is_contiguous(memory_format=torch.channels_last) and not conv_w.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(prepare_for_sampling(var)(2, 1, **kw), ref)   # exact again: bit for bit
    assert var.vae_proxy[0].decoder.conv_in.weight.is_contiguous()


def test_var_fast_path_is_the_exact_path():
    """VAR has no injection to hoist: in fp32 the fast path computes the exact path's logits, so with top_k=1,
    where both samplers take the argmax, the same tokens (only the decoder's layout, hence its last bits, differs)."""
    vae, var = tiny_vae_var(False)
    toks = {}
    for fast in (False, True):
        seen = toks[fast] = []
        h = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        try:
            prepare_for_sampling(var, dtype='fp32', fast=fast)(2, 1, g_seed=3, cfg=1.5, top_k=1, top_p=0.9)
        finally:
            h.remove()
    assert len(toks[True]) == 4 and all(torch.equal(a, b) for a, b in zip(toks[True], toks[False]))


def teacher_forced_logits(var, idx_Bl, label_B, fast: bool, dtype: str, schedule, solver=None, **prepare):
    """Per scale, the head's logits (2B, l, V) of a KV-cached sampling call whose tokens are all forced to idx_Bl
    (prepare: more prepare_for_sampling arguments, e.g. a compile scope)."""
    logits = []
    h = var.head.register_forward_hook(lambda m, a, out: logits.append(out.float().clone()))
    edit = EditSpec(gt_idx_Bl=idx_Bl, keep_Bl=[torch.ones_like(i, dtype=torch.bool) for i in idx_Bl])
    try:
        sampler = prepare_for_sampling(var, dtype=dtype, fast=fast, **prepare)
        sampler(B, label_B, g_seed=0, cfg=1.5, top_k=0, top_p=0.0, edit=edit, schedule=schedule, solver=solver)
    finally:
        h.remove()
    return logits


def agreement(a_list, b_list):
    """(max relative error over scales ||a - b|| / ||b||, fraction of positions whose argmax agrees, worst scale)."""
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(a_list, b_list))
    per_scale = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(a_list, b_list)]
    same = sum(float((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(a_list, b_list))
    return rel, same / sum(b.shape[0] * b.shape[1] for b in b_list), min(per_scale)


def _guard(patch_nums):
    """(var, forced tokens, labels) of a width-64 VIAR with 2 pre- and 2 post-blocks on the pyramid `patch_nums`."""
    vae, var = tiny_vae_var(True, depth=6, width=64, heads=4, pre=2, post=2, V=64, patch_nums=patch_nums, seed=5)
    idx_Bl, _ = tiny_tokens(vae, var, B, seed=2)
    return var, idx_Bl, torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope='module')
def guard_model():
    return _guard(PN)


@pytest.fixture(scope='module')
def small_guard_model():
    """guard_model on 3 scales (81 tokens an image): inductor compiles one graph per scale, ~15 s each."""
    return _guard((1, 4, 8))


@pytest.mark.parametrize('schedule, solver', [(S.constant(6, len(PN)), None), (S.decreasing(8, 3, len(PN)), None),
                                              (S.constant(6, len(PN)), SolverSpec('anderson', m=3))],
                         ids=['Con6', 'Dec8-3', 'Con6-anderson'])
def test_fp32_fast_path_logits_equal_the_exact_path_under_teacher_forcing(guard_model, schedule, solver):
    var, idx_Bl, label_B = guard_model
    exact = teacher_forced_logits(var, idx_Bl, label_B, False, 'fp32', schedule, solver)
    fast = teacher_forced_logits(var, idx_Bl, label_B, True, 'fp32', schedule, solver)
    rel, agree, worst = agreement(fast, exact)
    assert len(fast) == len(exact) == len(PN)
    assert rel <= 1e-4, f'fp32 fast logits differ by {rel:.2e} relative'
    assert agree >= 0.99 and worst >= 0.99, (agree, worst)


@pytest.mark.slow
@needs_c_compiler
def test_a_scale_step_compiled_by_inductor_keeps_the_fast_paths_bf16_figures(small_guard_model):
    """Scope 'scale' compiled by inductor (one graph per scale) against fp32 exact, beside eager --fast in bf16:
    its teacher-forced logits are as close to fp32 as eager's (bf16 rounding in another order, not another
    computation). In fp32 the captured step computes eager's logits bit for bit (test_gpu_paths.py, aot_eager)."""
    var, idx_Bl, label_B = small_guard_model
    sched = S.constant(2, len(idx_Bl))
    ref = teacher_forced_logits(var, idx_Bl, label_B, False, 'fp32', sched)
    torch._dynamo.reset()
    eager = agreement(teacher_forced_logits(var, idx_Bl, label_B, True, 'bf16', sched), ref)
    comp = agreement(teacher_forced_logits(var, idx_Bl, label_B, True, 'bf16', sched, compile=True, scope='scale',
                                           compile_vae=False), ref)
    print(f'\nbf16 vs fp32 exact, teacher-forced: compiled scale step rel {comp[0]:.2e}, argmax {comp[1]:.4f}; '
          f'eager fast rel {eager[0]:.2e}, argmax {eager[1]:.4f}')
    assert comp[0] <= 1.5 * eager[0] and comp[1] >= eager[1] - 0.01, (comp, eager)


def test_bf16_fast_path_figures_are_measured(guard_model):
    """bf16 rounding is not bounded by the guard: the figures are reported, beside the exact path's own bf16
    autocast (the official reduced-precision arithmetic) measured the same way against fp32."""
    var, idx_Bl, label_B = guard_model
    sched = S.constant(6, len(PN))
    ref = teacher_forced_logits(var, idx_Bl, label_B, False, 'fp32', sched)
    fast = agreement(teacher_forced_logits(var, idx_Bl, label_B, True, 'bf16', sched), ref)
    exact = agreement(teacher_forced_logits(var, idx_Bl, label_B, False, 'bf16', sched), ref)
    print(f'\nbf16 vs fp32 exact, teacher-forced: fast rel {fast[0]:.2e}, argmax {fast[1]:.4f} (worst scale '
          f'{fast[2]:.4f}); exact-path bf16 rel {exact[0]:.2e}, argmax {exact[1]:.4f} (worst {exact[2]:.4f})')
    assert 0 < fast[0] < 0.1 and fast[1] > 0.5   # bf16 rounding, not a different computation


@pytest.mark.parametrize('fast', [False, True])
def test_iterate_hook_records_the_iterates_on_both_paths(fast):
    _, var = tiny_vae_var(True)
    seen = []
    handle = var.register_iterate_hook(lambda z, z_next: seen.append((z.clone(), z_next.clone())))
    try:
        var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.explicit([1, 2, 3, 1], 4), fast=fast)
    finally:
        handle.remove()
    assert [s[1].shape[1] for s in seen] == [1, 4, 4, 9, 9, 9, 16]   # once per iteration, tokens of the scale
    # Picard: the z the hook sees at t + 1 is the z_next it saw at t (the iterate itself, not a projection of it)
    assert torch.equal(seen[1][1], seen[2][0]) and torch.equal(seen[3][1], seen[4][0]) and torch.equal(seen[4][1], seen[5][0])
    var.autoregressive_infer_cfg(2, 1, g_seed=0, schedule=S.constant(1, 4), fast=fast)
    assert len(seen) == 7   # removed


def test_iterates_agree_between_paths_and_anderson_runs_on_both():
    _, var = tiny_vae_var(True)
    runs = {}
    for fast in (False, True):
        for solver in (SolverSpec(), SolverSpec('anderson', m=3)):
            seen = []
            handle = var.register_iterate_hook(lambda z, z_next: seen.append(z_next.clone()))
            try:
                _, st = var.autoregressive_infer_cfg(2, 1, g_seed=0, cfg=1.5, top_k=1, schedule=S.constant(5, 4),
                                                     solver=solver, fast=fast, return_stats=True)
            finally:
                handle.remove()
            runs[fast, solver.kind] = seen
            assert st.iters == [5] * 4 and len(seen) == 20
    for kind in ('picard', 'anderson'):
        for a, b in zip(runs[True, kind], runs[False, kind]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(runs[False, 'anderson'][-1], runs[False, 'picard'][-1])   # Anderson did extrapolate


def test_tau_below_the_bf16_floor_is_refused_with_fast():
    _, var = tiny_vae_var(True)
    floor = RESIDUAL_FLOOR['bf16']
    with pytest.raises(SamplingError, match='floor') as e:
        SampleConfig(fast=True, dtype='bf16', tau=str(floor / 10)).check_model(var)
    assert '--tau' in str(e.value) and '--dtype fp32' in str(e.value) and '\n' not in str(e.value)
    SampleConfig(fast=True, dtype='bf16', tau=str(floor * 2)).check_model(var)         # above the floor
    SampleConfig(fast=True, dtype='fp32', tau=str(floor / 10)).check_model(var)        # fp32 has no such floor
    SampleConfig(fast=False, dtype='bf16', tau=str(floor / 10)).check_model(var)       # the exact path is left alone
    SampleConfig(fast=True, dtype='bf16').check_model(var)                             # a fixed schedule


def test_fast_flag_in_every_sampling_entry_point():
    import gen_img
    import sampling
    from bench import sample_speed
    from scripts import convergence
    for parser in (gen_img.build_parser(), sampling.build_parser(), sample_speed.build_parser(),
                   convergence.build_parser()):
        assert parser.parse_args(['--fast']).fast is True and parser.parse_args([]).fast is False


def test_sampling_records_the_fast_dtype_and_refuses_to_finish_in_another(tmp_path):
    import sampling
    from tests.tiny import write_tiny_export
    ckpt = write_tiny_export(tmp_path / 'tiny.pth')

    def cli(out, *extra):
        return ['--ckpt_path', ckpt, '--vae_ckpt', '', '--num_classes', '2', '--per_class', '2', '--batch_size', '2',
                '--iter_left', '2', '--iter_right', '2', '--device', 'cpu', '--progress', 'False',
                '--sample_dir', str(out), '--stop_after', '1', *extra]

    sampling.main(cli(tmp_path / 'a', '--fast'))   # --dtype auto: the machine's fast dtype, recorded
    plan, = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / 'a') for f in fs if f == sampling.SETTINGS_FILE]
    with open(plan) as f:
        assert json.load(f)['dtype'] == fast_dtype('cpu') in ('bf16', 'fp32')
    sampling.main(cli(tmp_path / 'b', '--dtype', 'fp32'))
    with pytest.raises(SystemExit) as e:
        sampling.main(cli(tmp_path / 'b', '--fast', '--dtype', 'bf16'))
    assert 'dtype: "fp32" -> "bf16"' in str(e.value) and '\n' not in str(e.value)
    sampling.main(cli(tmp_path / 'b', '--fast', '--dtype', 'fp32'))   # --fast in the folder's dtype finishes it


def test_physical_bound_and_extra_official_dtype_columns():
    from bench import sample_speed as ss
    side = dict(dtype='bf16', flops=2e9, images_per_s=4.0)
    b = ss.bound_fraction(side, B=4, gemm_rates={'bf16': 1e10})   # bound 0.2 s, call 1 s
    assert b['bound_s'] == pytest.approx(0.2) and b['of_bound'] == pytest.approx(0.2)
    assert ss.bound_fraction(side, B=4, gemm_rates={'fp32': 1e10}) == dict(bound_s=None, of_bound=None)
    meta = ss.cpu_meta(cpu_flags(CPUINFO_BF16), 'AVX512', {'ONEDNN_MAX_CPU_ISA': 'AVX2'})
    assert meta['flags'] == ['avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16'] and meta['native_bf16'] is False
    assert meta['caps'] == {'ONEDNN_MAX_CPU_ISA': 'AVX2'}

    def sd(ips, of):
        probe = dict(base_bytes=1, transformer_peak_bytes=2, decode_peak_bytes=3, peak_bytes=3)
        return dict(images_per_s=ips, transformer_images_per_s=ips, decode_images_per_s=ips, peak_rss_bytes=3,
                    kv_cache_bytes=1, probe=probe, flops=2e9, of_bound=of)
    row = dict(model='VAR', schedule='-', counts=None, iters_used=None, ours=sd(3.0, 0.5), official=sd(1.0, 0.3),
               official_bf16=sd(2.0, 0.2), ratio=3.0, transformer_ratio=3.0, same_images=False, ratio_official_bf16=1.5)
    meta = dict(machine='cpu x', device='cpu', threads=1, dtype='bf16', fast=True, official_dtypes=['fp32', 'bf16'],
                cpu=meta, gemm_gflops={'bf16': 10.0}, onednn_gemm_gflops={'bf16': 12.0}, B=4, depth=4, width=32, pre_depth=1, post_depth=1,
                patch_nums=[1, 2], image_px=32, var_ckpt='', reps=1, warmup=0, load_avg='0', basis='cpu')
    table = ss.markdown_table(dict(meta=meta, rows=[row]))
    head, _, cells = [l for l in table.splitlines() if l.startswith('|')]
    cols = dict(zip(head.strip('|').split(' | '), cells.strip('|').split(' | ')))
    cols = {k.strip(): v.strip() for k, v in cols.items()}
    assert cols['official bf16 img/s'] == '2.00' and cols['ratio vs official bf16'] == '1.50'
    assert cols['ours of bound'] == '50%' and cols['official fp32 of bound'] == '30%' and cols['official bf16 of bound'] == '20%'
    assert '--fast' in table and 'avx512_bf16' in table and 'ONEDNN_MAX_CPU_ISA=AVX2' in table
    assert 'bf16 10 (oneDNN Linear 12)' in table


@pytest.mark.slow
def test_fast_path_compiles_and_samples_the_eager_fast_tokens():
    """--fast --compile: graph capture of the blocks, the head norm and the channels_last decoder; the same tokens."""
    vae, var = tiny_vae_var(True)
    kw = dict(g_seed=3, cfg=1.5, top_k=1, schedule=S.explicit([2, 3, 1, 2], 4))
    runs = []
    for compile in (False, True):
        toks = []
        h = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: toks.append(a[0].clone()))
        try:
            img = prepare_for_sampling(var, dtype='fp32', fast=True, compile=compile, backend='aot_eager')(2, 1, **kw)
        finally:
            h.remove()
        runs.append((img, toks))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('use_implicit', [True, False])
def test_fast_sampler_casts_linear_weights_once_and_leaves_the_exact_path_bit_for_bit(use_implicit, monkeypatch):
    """bf16 fast sampling runs a copy whose Linear weights are bf16 (cast once, in prepare_for_sampling): the same
    images as autocast casting the fp32 weights itself (with the FFN's GELU unfused: fusing it rounds once less,
    tested below); every other tensor, the VQVAE and the iterate hooks are the model's own, and the exact sampler
    before and after gives the same images."""
    monkeypatch.setattr('models.blocks.onednn_dense', lambda dtype: False)
    _, var = tiny_vae_var(use_implicit)
    kw = dict(g_seed=3, cfg=1.5, top_k=8, top_p=0.9, schedule=S.decreasing(3, 1, 4))
    exact_before = prepare_for_sampling(var)(2, 1, **kw)
    sampler = prepare_for_sampling(var, dtype='bf16', fast=True)
    runner = sampler.runner
    assert runner is not var and runner.vae_proxy[0] is var.vae_proxy[0]
    lin = {n for n, m in var.named_modules() if isinstance(m, torch.nn.Linear)}
    for (name, p), q in zip(var.named_parameters(), runner.parameters()):
        if name.rpartition('.')[0] in lin:
            assert p.dtype == torch.float32 and q.dtype == torch.bfloat16, name
        else:
            assert q is p, f'{name} should be the model\'s own tensor'
    seen = []
    if use_implicit:   # a hook registered on the model after prepare watches the copy's sampling
        handle = var.register_iterate_hook(lambda z, z_next: seen.append(z_next.dtype))
    fast = sampler(2, 1, **kw)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        cast_per_call = var.autoregressive_infer_cfg(2, 1, fast=True, **kw)
    assert torch.equal(fast, cast_per_call)
    if use_implicit:
        handle.remove()
        assert seen and len(seen) == 2 * sum(S.decreasing(3, 1, 4).counts)   # the sampler's call and the direct one
    assert torch.equal(prepare_for_sampling(var)(2, 1, **kw), exact_before)


def test_bf16_fast_sampler_fuses_the_ffn_gelu_and_the_exact_path_does_not():
    """fc1 + GELU is one oneDNN kernel on the bf16 copy only; its output matches the unfused pair within bf16
    rounding (it rounds once, from fp32)."""
    _, var = tiny_vae_var(True)
    kw = dict(g_seed=3, cfg=1.5, top_k=8, schedule=S.constant(2, 4))
    for fast, fused in ((True, onednn_dense(torch.bfloat16)), (False, False)):   # a CPU without bf16 oneDNN: unfused
        ops = OpNames()
        with ops:
            prepare_for_sampling(var, dtype='bf16', fast=fast)(2, 1, **kw)
        assert ('mkldnn::_linear_pointwise' in ops.names) == fused, (fast, sorted(ops.names))
    ffn = prepare_for_sampling(var, dtype='bf16', fast=True).runner.post_blocks[0].ffn
    x = torch.randn(4, 9, ffn.fc1.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        got = ffn(x).float()
        want = ffn.fc2(ffn.act(ffn.fc1(x))).float()   # the unfused pair, each op rounding to bf16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_fp32_fast_sampler_shares_the_weights_and_runs_its_blocks_through_onednn():
    """fp32 --fast on a CPU: the copy holds the model's own tensors (no memory), its blocks' Linear layers run as
    oneDNN kernels (faster than torch's fp32 GEMM here, docs/SPEED.md), the exact path's do not, and its
    teacher-forced logits are the exact path's within the fp32 guard, with every bias non-zero (the official init
    zeroes them, so the guard model cannot tell a dropped bias)."""
    var, idx_Bl, label_B = _guard(PN)
    with torch.no_grad():
        for name, p in var.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.5)
    sampler = prepare_for_sampling(var, dtype='fp32', fast=True)
    assert sampler.runner is not var
    assert all(q is p for p, q in zip(var.parameters(), sampler.runner.parameters()))
    sched, logits = S.constant(3, len(PN)), {}
    for fast in (True, False):
        ops = OpNames()
        with ops:
            logits[fast] = teacher_forced_logits(var, idx_Bl, label_B, fast, 'fp32', sched)
        assert ('mkldnn::_linear_pointwise' in ops.names) == (fast and onednn_dense(torch.float32)), fast
    rel, agree, _ = agreement(logits[True], logits[False])
    assert rel <= 1e-4 and agree >= 0.99, (rel, agree)


@pytest.mark.slow
@pytest.mark.parametrize('scope', ['modules', 'scale'])
@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_a_second_call_of_the_same_schedule_compiles_nothing(dtype, scope):
    """--fast --compile: the first call captures the scale loop's graphs; a second call with the same schedule
    (other seed and labels) reuses them: no new frame compiled, no recompile (scope 'scale': one graph per scale,
    each reused)."""
    from torch._dynamo.utils import counters   # torch._dynamo only for this count: heavy to import
    _, var = tiny_vae_var(True)
    torch._dynamo.reset()
    counters.clear()
    sampler = prepare_for_sampling(var, dtype=dtype, fast=True, compile=True, backend='aot_eager', scope=scope)
    kw = dict(cfg=1.5, top_k=8, top_p=0.9, schedule=S.decreasing(3, 1, 4))
    sampler(2, 1, g_seed=3, **kw)
    first = dict(counters['stats'])
    assert first.get('unique_graphs', 0) > 0, 'nothing was compiled'
    sampler(2, 2, g_seed=4, **kw)
    assert counters['stats'].get('unique_graphs') == first['unique_graphs'], dict(counters['stats'])
    assert not counters['recompiles'], dict(counters['recompiles'])
