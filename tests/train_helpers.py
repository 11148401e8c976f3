"""Shared pieces of the training tests: a tiny class-folder dataset and the flags of a tiny run."""
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from tests.proc_util import run_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
FAULT_FLAGS = ('--nan_at_steps', '--kill_at_step', '--kill_node_at_step')   # tests/hooked_train.py's own flags


def make_image_folder(root: str, classes: int = 2, per_class: int = 8, val_per_class: int = 2, size: int = 16,
                      seed: int = 0) -> str:
    """train/ and val/ with `classes` folders of noisy single-colour PNGs (a class = a colour channel)."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', per_class), ('val', val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f'class{c}')
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3))
                img[..., c % 3] += 180
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f'{i}.png'))
    return root


TINY_ARCH = ['--pn=1_2_3_4', '--patch_size=4', '--vae_ch_mult=1_2_4', '--vae_ch=32', '--vae_num_res_blocks=1', '--V=32',
             '--Cvae=8', '--depth=4', '--width=32', '--heads=2', '--p_depth=1']


def tiny_flags(data: str, out: str, implicit: bool, *extra: str, arch: bool = True,
               vae_ckpt: str = 'random') -> List[str]:
    """A 4x4-token, width-32 VAR/VIAR with a random 16 px tokenizer; a few steps per second on a CPU core.

    arch=False leaves out the architecture flags (a run whose file sets them); vae_ckpt='' leaves out --vae_ckpt
    (the tokenizer a file comes with). The one place tests ask for a random tokenizer."""
    flags = [f'--data_path={data}', f'--local_out_dir_path={out}', '--device=cpu', '--jfb_n=0_3', '--jfb_m=1_3',
             '--bs=8', '--tlr=3e-3', '--twd=0.0', '--wp=0.5', '--log_every=1', '--step_log', '--seed=1',
             '--save_freq=1000',
             '--workers=0']   # in-process loading (official): no worker start-up per run; --workers=auto to override
    if arch:
        flags += TINY_ARCH + [f'--use_implicit={implicit}']
    if vae_ckpt:
        flags.append(f'--vae_ckpt={vae_ckpt}')
    return flags + list(extra)


def suggested_argv(message: str) -> List[str]:
    """The train.py arguments of the command a refusal suggests ('... python train.py --a=1 ...')."""
    return shlex.split(message.split('python train.py ', 1)[1])


def read_steps(path: str) -> Dict[int, dict]:
    """steps-rank<r>.jsonl as {step: record}; a step logged twice (before a kill and after the resume) keeps the last."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec['step']] = rec
    return out


def env_one_thread() -> Dict[str, str]:
    """The environment for child processes: repo importable, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    return env


def train_script(argv: List[str]) -> str:
    """train.py, or tests/hooked_train.py when argv holds one of its fault flags."""
    hooked = any(a.split('=', 1)[0] in FAULT_FLAGS for a in argv)
    return os.path.join(ROOT, 'tests', 'hooked_train.py') if hooked else os.path.join(ROOT, 'train.py')


def run_train(argv: List[str], timeout: int = 300, torchrun: int = 0, restarts: int = 0,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """train.py (train_script) in a child process (under torch.distributed.run with `torchrun` processes when > 0;
    env: variables added to env_one_thread's)."""
    cmd = [PYTHON, '-m', 'torch.distributed.run', f'--nproc_per_node={torchrun}', '--standalone',
           f'--max-restarts={restarts}'] if torchrun else [PYTHON]
    return run_group(cmd + [train_script(argv)] + argv, timeout, cwd=ROOT, env={**env_one_thread(), **(env or {})})
