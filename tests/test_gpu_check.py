"""bench/gpu_check.sh as a dry run on the CPU at tiny size: every step writes its own results and a summary line
as it ends, and a step over its time limit is recorded while the later steps still run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('--depth 4 --width 32 --heads 2 --p_depth 1 --patch_nums 1,2,3,4 --V 48 --Cvae 8 --vae_ch 32 '
        '--vae_ch_mult 1,1 --vae_num_res_blocks 1 --num_classes 5 --threads 1')


def run_check(out, **env):
    env = dict(os.environ, PY=sys.executable, OUT=str(out), DEVICE='cpu', EAGER_DTYPE='fp32', MODEL_ARGS=TINY,
               BS='2', SCHEDULE='2:1', OFFICIAL=str(out / 'no_official'), **env)
    done = subprocess.run(['bash', os.path.join(ROOT, 'bench', 'gpu_check.sh')], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    return (out / 'summary.txt').read_text()


@pytest.mark.slow
def test_each_step_writes_its_results(tmp_path):
    summary = run_check(tmp_path, STEPS='VIAR:eager VAR:fast', STEP_S='300')
    assert 'official: none' in summary
    for name, kind, fast in (('VIAR_eager', 'VIAR', False), ('VAR_fast', 'VAR', True)):
        assert f'{name}: rc=0' in summary
        result = json.loads((tmp_path / name / 'sample_speed.json').read_text())
        assert [r['model'] for r in result['rows']] == [kind] and result['meta']['fast'] is fast
        assert result['meta']['compile'] is False and result['meta']['compile_scope'] is None
        assert result['meta']['B'] == 2 and result['rows'][0]['ours']['wall_images_per_s'] > 0


@pytest.mark.slow
def test_a_step_over_its_limit_is_recorded_and_the_next_one_runs(tmp_path):
    summary = run_check(tmp_path, STEPS='VIAR:eager VAR:graphs', STEP_S='1', GRAPH_STEP_S='2')
    assert 'VIAR_eager: rc=124 (over 1s)' in summary and 'VAR_graphs: rc=124 (over 2s)' in summary   # its own limit


def test_the_script_lints_clean():
    if not shutil.which('shellcheck'):
        pytest.skip('shellcheck is not installed: SETUP_SYSTEM_PACKAGES=1 bash scripts/setup.sh installs it')
    lint = subprocess.run(['shellcheck', os.path.join(ROOT, 'bench', 'gpu_check.sh')], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
