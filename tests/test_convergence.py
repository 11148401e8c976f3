"""scripts/convergence.py: its per-scale curves equal a direct computation of successive iterates; tau feeds schedules."""
import json
import math

import pytest
import torch

from models import schedules as S
from models.config import ModelSpec
from scripts import convergence as cv
from utils.sample import schedule_flags

SIZE = dict(depth=4, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3, 4), V=48, Cvae=8, vae_ch=32, vae_ch_mult=(1, 1),
            vae_num_res_blocks=1, num_classes=5, use_implicit=True, pre_depth=1, post_depth=1)
FLAGS = ['--var_ckpt', 'random', '--depth', '4', '--width', '32', '--heads', '2', '--patch_nums', '1,2,3,4',
         '--V', '48', '--Cvae', '8', '--vae_ch', '32', '--vae_ch_mult', '1,1', '--vae_num_res_blocks', '1',
         '--num_classes', '5', '--pre_depth', '1', '--post_depth', '1', '--device', 'cpu',
         '--top_k', '10', '--top_p', '0.9', '--cfg', '2.0']


def test_suggest_tau_sits_between_the_residuals_either_side_of_the_first_iteration_reaching_the_target():
    tau, n = cv.suggest_tau([0.5, 0.995, 0.999], [0.3, 0.03, 0.01], 0.99)
    assert n == 2 and tau == pytest.approx(math.sqrt(0.3 * 0.03)) and 0.03 < tau < 0.3
    assert cv.suggest_tau([0.995, 0.999], [0.3, 0.03], 0.99) == (0.3, 1)      # one iteration: nothing before it
    assert cv.suggest_tau([0.5, 0.995], [0.03, 0.3], 0.99) == (0.3, 2)        # a residual that rose: no margin below
    assert cv.suggest_tau([0.5, 0.6], [0.3, 0.2], 0.99) == (0.2, None)


@pytest.mark.parametrize('target_cos', [0.5, 0.9, 0.99])
def test_adaptive_sampling_at_the_suggested_tau_runs_the_iterations_convergence_reports(target_cos):
    """'reached after n iterations' and the sampler's 'implicit iterations per scale' count the same thing (calls of
    the implicit block), and the suggested tau stops the same batch after exactly n at every scale, though the
    adaptive run's earlier scales stop sooner than the T iterations measured and so feed later scales other inputs."""
    torch.manual_seed(0)
    _, var = ModelSpec(**SIZE).build()
    var.eval()
    kw = dict(cfg=2.0, top_k=10, top_p=0.9)
    for seed in range(4):
        labels = torch.randint(0, 5, (3,), generator=torch.Generator().manual_seed(seed))
        r = cv.measure_convergence(var, labels, 12, g_seed=seed, target_cos=target_cos, **kw)
        assert None not in r['iters_to_target']
        with torch.no_grad():
            _, stats = var.autoregressive_infer_cfg(3, labels, g_seed=seed, schedule=S.adaptive(r['suggested_tau'], 12, 4),
                                                    return_stats=True, **kw)
        assert stats.iters == r['iters_to_target'], (seed, r['suggested_tau'])


def test_step_metrics_on_known_vectors():
    z = torch.tensor([[[1.0, 0.0]], [[5.0, 5.0]]])          # row 1 is the unconditional half: ignored by the means
    z_next = torch.tensor([[[1.0, 1.0]], [[5.0, 5.0]]])
    m = cv.step_metrics(z_next, z, B=1)
    assert m['cosine'] == pytest.approx(1 / math.sqrt(2))
    assert m['rel_residual'] == pytest.approx(1.0)
    assert m['solver_residual'] == pytest.approx(1.0 / math.sqrt(52), rel=1e-5)   # over both halves, / ||z_next||


def _direct_curves(seed: int, T: int, B: int):
    """Rebuild the same random model and compute the metrics from raw iterates, without the script's hooks."""
    torch.manual_seed(seed)
    _, var = ModelSpec(**SIZE).build()
    var.eval()
    iterates = []   # (z0 from the last pre-block, then every implicit-block output), in call order
    h1 = var.pre_blocks[-1].register_forward_hook(lambda m, a, o: iterates.append(('x', o.clone())))
    h2 = var.implicit_block.register_forward_hook(lambda m, a, o: iterates.append(('z', o.clone())))
    labels = torch.randint(0, 5, (B,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        var.autoregressive_infer_cfg(B, labels, g_seed=seed, cfg=2.0, top_k=10, top_p=0.9, schedule=S.constant(T, 4))
    h1.remove(), h2.remove()
    cos, rel = [], []
    for kind, z in iterates:
        if kind == 'x':
            prev, cos_s, rel_s = z, [], []
            cos.append(cos_s), rel.append(rel_s)
            continue
        a, b = z[:B].flatten(1), prev[:B].flatten(1)
        cos_s.append(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item())
        rel_s.append(((a - b).norm(dim=1) / b.norm(dim=1)).mean().item())
        prev = z
    return cos, rel


def test_script_matches_direct_iterates_and_writes_files(tmp_path, capsys):
    T, B, seed = 4, 3, 2
    result = cv.main(FLAGS + ['--T', str(T), '--bs', str(B), '--seed', str(seed), '--out_dir', str(tmp_path)])
    saved = json.loads((tmp_path / 'convergence.json').read_text())
    assert (tmp_path / 'convergence.png').read_bytes()[:4] == b'\x89PNG'
    assert saved['patch_nums'] == [1, 2, 3, 4] and saved['suggested_tau'] == result['suggested_tau']
    assert [len(c) for c in saved['cosine']] == [T] * 4 and [len(r) for r in saved['rel_residual']] == [T] * 4
    cos, rel = _direct_curves(seed, T, B)
    assert len(cos) == 4
    for k in range(4):
        assert saved['cosine'][k] == pytest.approx(cos[k], abs=1e-5)
        assert saved['rel_residual'][k] == pytest.approx(rel[k], rel=1e-4, abs=1e-6)
    printed = capsys.readouterr().out
    assert 'suggested adaptive tau' in printed and 'iterations = calls of the implicit block' in printed
    for pn, n in zip(saved['patch_nums'], saved['iters_to_target']):
        assert (f'{pn}x{pn}' in printed and f'after {n} iteration' in printed) if n else 'not reached' in printed


def test_fast_flag_keeps_fp32_unless_a_dtype_is_asked_and_records_it(tmp_path):
    """--fast alone measures in fp32 (a bf16 residual floor would hide the convergence curve); the JSON says the
    dtype and the fast flag it was measured with."""
    cv.main(FLAGS + ['--T', '2', '--bs', '1', '--fast', '--out_dir', str(tmp_path / 'a')])
    saved = json.loads((tmp_path / 'a' / 'convergence.json').read_text())
    assert saved['dtype'] == 'fp32' and saved['fast'] is True
    cv.main(FLAGS + ['--T', '2', '--bs', '1', '--fast', '--dtype', 'bf16', '--out_dir', str(tmp_path / 'b')])
    assert json.loads((tmp_path / 'b' / 'convergence.json').read_text())['dtype'] == 'bf16'


def test_suggested_tau_feeds_the_adaptive_schedule(tmp_path):
    cv.main(FLAGS + ['--T', '3', '--bs', '2', '--target_cos', '0.5', '--out_dir', str(tmp_path)])
    path = str(tmp_path / 'convergence.json')
    taus = json.loads(open(path).read())['suggested_tau']
    sched = schedule_flags.from_cli(4, tau_json=path, cap=3)
    assert sched.adaptive and sched.tau == pytest.approx(taus) and sched.counts == [3] * 4


def test_missing_checkpoint_flag_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='--var_ckpt'):
        cv.main(['--out_dir', str(tmp_path)])
