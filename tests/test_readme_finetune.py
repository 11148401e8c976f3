"""The README's 'Fine-tune on your own data' block, run as written on a quick demo.

The block's first code block is run line by line in a fresh folder, with demo_output/ pointing at a quick demo,
`.venv/bin/python` this interpreter, the scripts by their path in this checkout, and FT_EPOCHS=1 (the block reads
it, so the test trains one epoch instead of three).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_finetune_block():
    """The command lines of the first bash block under '## Fine-tune on your own data'."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split('## Fine-tune on your own data', 1)[1]
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith('#')]


@pytest.mark.slow
def test_readme_finetune_block_runs_on_a_quick_demo(quick_demo, tmp_path):
    lines = readme_finetune_block()
    assert len(lines) == 3 and '--init_ckpt=demo_output/viar/viar-slim.safetensors' in lines[1]
    assert not re.search(r'--(depth|width|heads|pn|V|Cvae|vae_\w+|patch_size|use_implicit|p_depth)[= ]', lines[1])
    os.symlink(quick_demo, tmp_path / 'demo_output')
    env = dict(os.environ, FT_EPOCHS='1', OMP_NUM_THREADS='1')
    logs = []
    for line in lines:
        cmd = line.replace('.venv/bin/python', sys.executable)
        for script in ('train.py', 'gen_img.py'):
            cmd = cmd.replace(f' {script} ', f' {os.path.join(ROOT, script)} ')
        proc = subprocess.run(['bash', '-c', cmd], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, (line, proc.stdout[-3000:], proc.stderr[-3000:])
        logs.append(proc.stdout + proc.stderr)
    log = (tmp_path / 'my_run' / 'log.txt').read_text()
    assert 'VIAR depth 6 (1 pre + implicit + 1 post)' in log and 'set by demo_output/viar/viar-slim.safetensors' in log
    assert 'peak lr 0.001 = --tlr' in log and 'ETA' in log
    assert '(no val/ folder: 5% of each class held out of training), 2 classes' in log
    from utils.checkpoint import read_checkpoint
    export = read_checkpoint(str(tmp_path / 'my_run' / 'viar-slim.safetensors'))
    assert export['class_names'] == ['eight', 'three']
    assert export['sampling'] == read_checkpoint(str(quick_demo / 'viar' / 'viar-slim.safetensors'))['sampling']
    assert 'sampling defaults from the file: cfg 0' in logs[-1]
    samples = tmp_path / 'my_run' / 'samples' / 'viar-slim'
    for c in (0, 1):   # eight = 0, three = 1
        assert len(list(samples.glob(f'class{c}_seed[0-3].png'))) == 4
