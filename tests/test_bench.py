"""The benchmarks: sampling (schedule parsing, summaries, a tiny end-to-end run of the project side alone) and the
training modes of bench/train_speed.py at tiny sizes."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import measure
from bench import sample_speed as ss
from bench import train_speed as ts
from models.blocks import onednn_dense
from tests.tiny import OpNames, tiny_vae_var, write_tiny_export
from utils.sample.compile_util import prepare_for_sampling

TINY = ['--depth', '4', '--width', '32', '--heads', '2', '--p_depth', '1', '--patch_nums', '1,2,3,4', '--V', '48',
        '--Cvae', '8', '--vae_ch', '32', '--vae_ch_mult', '1,1', '--vae_num_res_blocks', '1', '--num_classes', '5',
        '--bs', '2', '--top_k', '10', '--top_p', '0.9', '--threads', '1', '--device', 'cpu']


def test_parse_schedule_tokens():
    con, = ss.parse_schedules('10:10', 4, cap=20)
    assert con['name'] == 'Con.(10,10)' and con['counts'] == [10] * 4 and con['tau'] is None
    dec, = ss.parse_schedules('20:5', 10, cap=20)
    assert dec['name'] == 'Dec.(20,5)' and dec['counts'][0] == 20 and dec['counts'][-1] == 5
    ada, = ss.parse_schedules('tau=0.05', 3, cap=7)
    assert ada['tau'] == [0.05] * 3 and ada['counts'] == [7] * 3 and ada['name'].startswith('Ada.')
    for bad in ('10', 'x:y', 'tau=json', 'tau=abc'):
        with pytest.raises(ValueError):
            ss.parse_schedules(bad, 4, cap=20)


def test_parse_schedule_reads_convergence_json(tmp_path):
    path = tmp_path / 'convergence.json'
    path.write_text(json.dumps({'suggested_tau': [0.1, 0.2, 0.3]}))
    assert ss.parse_schedules('tau=json', 3, cap=5, tau_json=str(path))[0]['tau'] == [0.1, 0.2, 0.3]


def test_summarise_splits_transformer_and_decode_on_the_chosen_clock():
    reps = [dict(wall_s=w, decode_wall_s=1.0, cpu_s=w / 2, decode_cpu_s=0.5) for w in (5.0, 3.0, 4.0)]
    s = ss.summarise(reps, B=8, basis='wall')
    assert s['images_per_s'] == pytest.approx(8 / 3.0)          # best call
    assert s['transformer_images_per_s'] == pytest.approx(8 / 2.0)
    assert s['decode_images_per_s'] == pytest.approx(8.0)
    c = ss.summarise(reps, B=8, basis='cpu')
    assert c['images_per_s'] == pytest.approx(8 / 1.5) == c['cpu_images_per_s'] and c['wall_images_per_s'] == s['images_per_s']
    assert ss.timing_basis('cpu', 1) == 'cpu' and ss.timing_basis('cpu', 2) == 'wall' and ss.timing_basis('cuda', 1) == 'wall'


def test_reliability_flags_a_loaded_machine_and_repeats_that_disagree():
    assert ss.reliability(1.5, 2, [1.0, 1.05, 1.02]) == []
    assert ss.reliability(2.0, 2, [1.0, 1.09]) == []                       # at the thread count, within 10%
    assert ss.reliability(3.1, 2, [1.0, 1.05]) == ['load 3.1 > 2 CPU threads']
    assert ss.reliability(0.5, 2, [0.41, 1.0, 0.4]) == ['repeats differ by 150% > 10%']
    assert len(ss.reliability(9.0, 2, [1.0, 2.0])) == 2
    assert ss.reliability(0.5, 2, [1.0]) == []                             # one call: no spread to judge
    assert ss.reliability(0.5, 2, [1.0, 1.3], spread_limit=0.5) == []
    assert ss.timing_cell(dict(unreliable=[])) == 'ok' and ss.timing_cell({}) == '-'
    assert ss.timing_cell(dict(unreliable=['a', 'b'])) == 'UNRELIABLE: a; b'


def _side(ips, mem, kv=1024):
    probe = dict(base_bytes=mem // 2, transformer_peak_bytes=mem * 3 // 4, decode_peak_bytes=mem, peak_bytes=mem)
    return dict(images_per_s=ips, transformer_images_per_s=2 * ips, decode_images_per_s=3 * ips, peak_rss_bytes=mem,
                kv_cache_bytes=kv, probe=probe)


def test_table_and_plot_with_official_rows(tmp_path):
    meta = dict(machine='test cpu', device='cpu', threads=1, dtype='fp32', B=2, depth=4, width=32, pre_depth=1,
                post_depth=1, patch_nums=[1, 2], image_px=32, var_ckpt='', reps=1, warmup=0, load_avg='0', basis='cpu')
    rows = [dict(model='VAR', schedule='-', counts=None, iters_used=None, ours=_side(2.0, 2 ** 30),
                 official=_side(1.0, 2 ** 30), ratio=2.0, transformer_ratio=2.0, same_images=True),
            dict(model='VIAR', schedule='Con.(2,2)', counts=[2, 2], iters_used=[2, 2], ours=_side(1.5, 2 ** 29),
                 official=_side(1.0, 2 ** 29), ratio=1.5, transformer_ratio=1.5, same_images=False),
            dict(model='VIAR', schedule='Ada.(tau=0.1,cap=2)', counts=[2, 2], iters_used=[1, 2],
                 ours=dict(_side(1.8, 2 ** 29), wall_images_per_s=1.2, cpu_images_per_s=1.8),
                 unreliable=['load 3.1 > 2 CPU threads'])]
    table = ss.markdown_table(dict(meta=meta, rows=rows))
    lines = [l for l in table.splitlines() if l.startswith('| ')]
    assert len(lines) == 1 + len(rows)
    assert '| yes |' in lines[1] and '| NO |' in lines[2] and 'n/a' in lines[3]
    cols = [dict(zip(lines[0].split(' | '), line.split(' | '))) for line in lines[1:]]
    assert (cols[2]['img/s wall'], cols[2]['img/s CPU']) == ('1.20', '1.80')       # both clocks, side by side
    assert (cols[0]['img/s wall'], cols[0]['img/s CPU']) == ('-', '2.00')          # an older row: its basis only
    assert cols[2]['timing'] == 'UNRELIABLE: load 3.1 > 2 CPU threads' and cols[0]['timing'] == '-'
    assert 'test cpu' in table
    ss.plot(dict(meta=meta, rows=rows), str(tmp_path / 'p.png'))
    assert (tmp_path / 'p.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_benchmark_runs_tiny_models_end_to_end(tmp_path):
    out = tmp_path / 'bench'
    result = ss.main(TINY + ['--schedules', '2:1,tau=0.5', '--tau_cap', '3', '--warmup', '0', '--reps', '1',
                             '--out', str(out)])
    for name in ('sample_speed.json', 'sample_speed.md', 'sample_speed.png'):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / 'sample_speed.json').read_text())
    assert [r['model'] for r in saved['rows']] == ['VAR', 'VIAR', 'VIAR']
    var_row, dec_row, ada_row = saved['rows']
    assert dec_row['iters_used'] == [2, 1, 1, 1]
    assert all(1 <= n <= 3 for n in ada_row['iters_used'])
    for r in saved['rows']:
        o = r['ours']
        assert o['images_per_s'] > 0 and o['transformer_images_per_s'] >= o['images_per_s']
        assert o['peak_rss_bytes'] > 0 and o['kv_cache_bytes'] > 0
        p = o['probe']
        assert 0 < p['base_bytes'] <= p['transformer_peak_bytes'] <= p['peak_bytes'] <= o['peak_rss_bytes']
        assert o['basis'] == 'cpu' and o['cpu_images_per_s'] > 0 and o['wall_images_per_s'] > 0
        assert len(r['load_avg']) == 2 and isinstance(r['unreliable'], list)
        assert 'official' not in r
    # the implicit block's per-iteration caches make VIAR hold more KV bytes than its explicit blocks alone
    assert ada_row['ours']['kv_cache_bytes'] >= dec_row['ours']['kv_cache_bytes']
    assert result['meta']['official'] is None
    # the bound's rate, and beside it oneDNN's Linear rate where this CPU's oneDNN runs fp32
    assert set(saved['meta']['gemm_gflops']) == {'fp32'}
    assert set(saved['meta']['onednn_gemm_gflops']) == ({'fp32'} if onednn_dense(torch.float32) else set())


def test_sweep_rows_and_table_take_each_rows_own_batch():
    rows = [dict(model='VAR', schedule='-', B=b, ours=dict(images_per_s=ips, flops=f, bound_s=0.1, of_bound=of))
            for b, ips, f, of in ((1, 2.0, 1e9, 0.25), (4, 6.0, 4e9, 0.6))]
    sweep = ss.sweep_rows(rows)
    assert [(s['B'], s['images_per_s'], s['of_bound']) for s in sweep] == [(1, 2.0, 0.25), (4, 6.0, 0.6)]
    lines = ss.sweep_table(sweep).splitlines()
    assert lines[0] == '| model | schedule | batch | img/s | GFLOP/call | of bound |'
    assert lines[2:] == ['| VAR | - | 1 | 2.000 | 1.0 | 25% |', '| VAR | - | 4 | 6.000 | 4.0 | 60% |']


@pytest.mark.slow
def test_batch_size_sweep_runs_each_config_at_each_batch(tmp_path):
    result = ss.main(TINY + ['--models', 'VAR', '--batch_sizes', '1,3', '--warmup', '0', '--reps', '1',
                             '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'sample_speed.json').read_text())
    one, three = saved['sweep']
    assert (one['B'], three['B']) == (1, 3) and saved['meta']['batch_sizes'] == [1, 3]
    by_b = {r['B']: r['ours'] for r in saved['rows']}
    # a call at batch 3 samples three times the tokens: three times the KV cache and the FLOPs of batch 1
    assert by_b[3]['kv_cache_bytes'] == 3 * by_b[1]['kv_cache_bytes'] > 0
    assert three['flops'] == pytest.approx(3 * one['flops'], rel=1e-3) and one['flops'] > 0
    for s in (one, three):   # the bound of a call over its best time, on this CPU's fp32 GEMM rate
        assert 0 < s['of_bound'] < 1 and s['images_per_s'] == by_b[s['B']]['images_per_s']
    md = (tmp_path / 'sample_speed.md').read_text()
    assert '| VAR | - | 1 |' in md and '| VAR | - | 3 |' in md and 'batch 1,3' in md
    assert result['sweep'] == saved['sweep']


def test_bad_flags_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match='--models'):
        ss.main(TINY + ['--models', 'GPT', '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match='--official'):
        ss.main(TINY + ['--official', str(tmp_path / 'nope'), '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match='--schedules'):
        ss.main(TINY + ['--models', 'VIAR', '--schedules', '3', '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match='--batch_sizes must be positive'):
        ss.main(TINY + ['--batch_sizes', '2,0', '--out', str(tmp_path)])


# ---------------------------------------------------------------- bench/train_speed.py

def test_train_speed_modes_their_aliases_and_defaults():
    b, _ = ts.parse_args(['--loader'])
    assert (b.mode, b.steps, b.warmup, b.threads) == ('loader', 5, 2, 0)
    assert ts.parse_args(['--fsdp'])[0].mode == 'fsdp_memory'
    b, _ = ts.parse_args(['--mode', 'token_cache'])
    assert (b.steps, b.warmup, b.threads) == (6, 1, 1)
    b, g = ts.parse_args(['--steps', '3', '--depths', '4_8', '--pn', '1,2'])
    assert (b.mode, b.steps, g[ts.StepArgs].depths, g[ts.StepArgs].pn) == ('steps', 3, (4, 8), (1, 2))


def test_train_steps_viar_saves_the_same_activations_at_any_depth(tmp_path):
    out = tmp_path / 'rows.json'
    rows = ts.main(['--depths', '3,5', '--m', '1', '--width', '32', '--heads', '2', '--pn', '1_2_3', '--V', '16',
                    '--Cvae', '8', '--steps', '1', '--warmup', '0', '--device', 'cpu', '--json', str(out)])
    assert json.loads(out.read_text()) == rows
    by = {(r['model'], r['eff_depth']): r for r in rows}
    assert by['viar', 5]['n'] == 2 and by['viar', 3]['n'] == 0
    assert all(r['step_ms'] > 0 and r['peak_mib'] is None for r in rows)
    assert by['viar', 5]['saved_act_mib'] == by['viar', 3]['saved_act_mib'] > 0     # no-grad iterations save nothing
    assert by['var', 5]['saved_act_mib'] > by['var', 3]['saved_act_mib']


def test_loader_mode_counts_images_per_cpu_second(tmp_path, capsys):
    rows = ts.main(['--loader', '--loader_images', '8', '--image_size', '40x30', '--reso', '16',
                    '--loader_workers', '0', '--loader_batches', '2', '--batch', '4', '--gpu_rates', '10'])
    assert [(r['workers'], r['images']) for r in rows] == [(0, 8)] and rows[0]['img_per_cpu_s'] > 0
    assert 'a GPU training 10 img/s needs' in capsys.readouterr().out


def test_fsdp_memory_meta_shards_equal_the_arithmetic():
    one, two = ts.meta_rows(names=('VIAR-d30',), worlds=(1, 2))
    assert one['match'] and two['match'] and one['params'] == 770_884_426
    assert two['total'] < one['total'] / 2 + one['root_fp32'] and two['root_fp32'] == one['root_fp32']


@pytest.mark.slow
def test_token_cache_mode_on_the_demo_config(tmp_path):
    out = ts.main(['--mode', 'token_cache', '--configs', 'demo', '--steps', '1', '--warmup', '0', '--threads', '0',
                   '--json', str(tmp_path / 'tc.json')])
    r, = out['rows']
    assert (r['config'], r['resolution'], r['tokens'], r['batch']) == ('demo', 16, 30, 64)
    assert r['step_s_images'] > 0 and r['step_s_cache'] > 0 and r['cache_bytes_per_image'] > 0
    assert set(json.loads((tmp_path / 'tc.json').read_text())) == {'machine', 'load_avg_after', 'threads', 'steps',
                                                                    'rows', 'torch'}


def test_benchmark_reads_a_tau_json_on_the_checkpoints_scales(tmp_path):
    from bench import sample_speed as ss
    from utils.sample.config import parse
    ckpt = write_tiny_export(tmp_path / 'viar4.pth')
    tau = tmp_path / 'convergence.json'
    tau.write_text(json.dumps({'suggested_tau': [0.1, 0.05, 0.02, 0.01]}))
    argv = ['--var_ckpt', ckpt, '--schedules', '4:4,tau=json', '--tau_json', str(tau)]
    _, source, sample = parse(ss.build_parser(), argv, schedule_list=True)
    K, scheds = ss.plan_schedules(source, sample, '4:4,tau=json')
    assert K == 4 and scheds[1]['tau'] == [0.1, 0.05, 0.02, 0.01]
    _, source, sample = parse(ss.build_parser(), argv[2:], schedule_list=True)   # random weights: 10 scales
    with pytest.raises(SystemExit, match='4 tau values but this model has 10 scales'):
        ss.plan_schedules(source, sample, '4:4,tau=json')


def test_flop_count_includes_attention_and_the_fused_fc1():
    """The bound's FLOPs count CPU flash attention and oneDNN's fused Linear + GELU, which torch's counter gives 0:
    so a fast call in bf16 (fc1 fused where oneDNN has bf16 kernels) counts what the same call in fp32 counts."""
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 40, 8)
    with FlopCounterMode(display=False, custom_mapping=measure.uncounted_flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, k, k)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 40 * 8)   # q k^T, then the weights times v
    vae, var = tiny_vae_var(True)
    flops = {}
    for dtype in ('fp32', 'bf16'):
        sampler = prepare_for_sampling(var, dtype=dtype, fast=True)
        call = measure.TimedCall(lambda: sampler(2, 1, g_seed=0, top_k=4), vae, torch.device('cpu'))
        flops[dtype] = call.memory()['flops']
    assert flops['bf16'] == flops['fp32'] > 0, flops


@pytest.mark.parametrize('onednn', [False, True])
def test_gemm_rate_times_torch_mm_or_the_fast_samplers_onednn_kernel(onednn):
    """The bound's rate is torch.mm's; with onednn=True it is the kernel the fast sampler's blocks call (reported
    beside it, so a machine shows whether that kernel pays)."""
    with OpNames() as ops:
        rate = measure.gemm_rate(torch.float32, M=16, K=8, N=12, reps=1, onednn=onednn)
    assert rate > 0
    assert ('mkldnn::_linear_pointwise' in ops.names) == onednn and ('aten::mm' in ops.names) == (not onednn)
