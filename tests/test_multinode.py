"""Multi-node launch on one CPU machine: two elastic torchrun launchers (scripts/train.sh, c10d rendezvous on
127.0.0.1, gloo, one rank each) act as two nodes; a node's worker is killed, then the whole node is killed and
started again, and training resumes exactly; a hung peer fails a collective after VIAR_DIST_TIMEOUT_S.
scripts/train_slurm.sh and train.sh's launch forms run under fake srun/scontrol/sbatch/python."""
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest
import torch

from tests.proc_util import kill_tree, run_group
from tests.train_helpers import ROOT, env_one_thread, make_image_folder, read_steps, tiny_flags, train_script

TRAIN_SH = os.path.join(ROOT, 'scripts', 'train.sh')
SLURM_SH = os.path.join(ROOT, 'scripts', 'train_slurm.sh')
STEPS = 40                       # --ep=20 x 2 iterations per epoch (16 images, global batch 8)
# train.sh's official recipe flags that a tiny CPU run has to undo (the last value of a flag wins)
UNDO_RECIPE = ('--fp16=0', '--twde=0', '--vae_ckpt=random')
# short timeouts, so that a broken rendezvous or a dead peer fails the test in seconds, not in 10-30 minutes
RDZV_CONF = 'join_timeout=60,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3'
NODE_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Node:
    """One `bash scripts/train.sh` launcher (torchrun, elastic form) acting as one node; output in <log>."""

    def __init__(self, port: int, rdzv_id: str, flags: List[str], log: str):
        env = env_one_thread()
        env.update(NPROC='1', NNODES='2', RDZV_ID=rdzv_id, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                   RDZV_CONF=RDZV_CONF, MAX_RESTARTS='3', VIAR_DIST_TIMEOUT_S='30', PYTHON=sys.executable,
                   LOGLEVEL='INFO')   # torchrun's rendezvous and restart messages, asserted below
        if train_script(flags).endswith('hooked_train.py'):   # fault flags: train.sh's workers run hooked_train.py
            env.update(PYTHON=os.path.join(ROOT, 'tests', 'hooked_python'), HOOKED_PYTHON=sys.executable)
        self.log = log
        with open(log, 'a') as f:
            self.proc = subprocess.Popen(['bash', TRAIN_SH] + flags, cwd=ROOT, env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, deadline: float) -> Optional[int]:
        """The launcher's exit status; None when it was still running at the deadline (it is then killed)."""
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        kill_tree(self.proc.pid)
        self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        return open(self.log).read()[-n:]


def _wait_port(port: int, timeout: float = 30):
    """Until the c10d rendezvous store listens (the first node hosts it; it must not be the one we kill)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f'no rendezvous store on port {port} after {timeout} s')


def _max_step(out: str) -> int:
    steps = [0]
    for r in (0, 1):
        path = f'{out}/steps-rank{r}.jsonl'
        if os.path.exists(path):
            try:
                steps += list(read_steps(path))
            except ValueError:   # a line being written
                pass
    return max(steps)


def _tails(what: str, nodes: List[Node]) -> str:
    """An assertion message: what happened, then the end of every launcher's output (a hang shows on both)."""
    return '\n'.join([what] + [f'---- {n.log}:\n{n.tail()}' for n in nodes])


def _run_two_nodes(data: str, out: str, tag: str, b_extra=(), restart_b: bool = False) -> Dict:
    """Node A (the rendezvous store's host) and node B train the tiny VIAR; B gets b_extra. With restart_b, B's
    first launcher is expected to die (b_extra holds --kill_node_at_step: its worker SIGKILLs the launcher and then
    itself, at a step of the run, not at whatever step a poll of the logs happens to see); B is then started again
    without b_extra. Returns both ranks' step logs, log.txt, the launchers' output and the last step logged when
    B was found dead."""
    os.makedirs(out, exist_ok=True)
    flags = tiny_flags(data, out, True, f'--ep={STEPS // 2}', '--save_every_steps=4', *UNDO_RECIPE)
    port, deadline = _free_port(), time.time() + NODE_TIMEOUT_S
    logs = {k: os.path.join(out, f'node-{k}.out') for k in 'AB'}
    nodes = []
    try:
        nodes.append(Node(port, tag, flags, logs['A']))
        _wait_port(port)
        nodes.append(Node(port, tag, flags + list(b_extra), logs['B']))
        killed_at = None
        if restart_b:
            rc_b = nodes[1].wait(deadline)
            assert rc_b == -signal.SIGKILL, _tails(f'node B exited with {rc_b}, not by its test hook', nodes)
            killed_at = _max_step(out)
            nodes.append(Node(port, tag, flags, logs['B']))   # node B comes back (without the test hooks)
        rcs = [nodes[0].wait(deadline), nodes[-1].wait(deadline)]
        assert rcs == [0, 0], _tails(f'exit status of A and B {rcs} (None: timed out, killed)', nodes)
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    return dict(r0=read_steps(f'{out}/steps-rank0.jsonl'), r1=read_steps(f'{out}/steps-rank1.jsonl'),
                log=open(f'{out}/log.txt').read(), out_a=open(logs['A']).read(), out_b=open(logs['B']).read(),
                killed_at=killed_at)


def _weights(out: str) -> Dict[str, torch.Tensor]:
    ck = torch.load(f'{out}/ar-ckpt-last.pth', map_location='cpu', weights_only=False)
    assert ck['g_it'] == STEPS and ck['world_size'] == 2
    return ck['trainer']['var_wo_ddp']


def _assert_same_run(run: Dict, ref: Dict, out: str, ref_out: str):
    """Every step of both ranks is present and equals the uninterrupted run, as do the final weights: bit for bit
    on CPU, like the single-process resume in test_train_run."""
    for r in ('r0', 'r1'):
        assert sorted(run[r]) == list(range(1, STEPS + 1)), r
        for s in range(1, STEPS + 1):
            a, b = run[r][s], ref[r][s]
            assert (a['n'], a['m'], a['lr'], a['stepped']) == (b['n'], b['m'], b['lr'], b['stepped']), (r, s)
            assert a['loss'] == b['loss'], (r, s)
    wa, wb = _weights(out), _weights(ref_out)
    for k, v in wb.items():
        assert torch.equal(wa[k], v), k


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imgs')))


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """An uninterrupted two-node run: the numbers every interrupted run must reproduce."""
    out = str(tmp_path_factory.mktemp('ref'))
    return out, _run_two_nodes(data, out, 'ref')


@pytest.mark.slow
def test_two_nodes_train_together_with_identical_jfb_draws(reference):
    _, ref = reference
    r0, r1 = ref['r0'], ref['r1']
    assert sorted(r0) == sorted(r1) == list(range(1, STEPS + 1))
    # S-JFB (n, m), lr and the update decision agree on both nodes at every step
    assert [(r0[s]['n'], r0[s]['m'], r0[s]['lr'], r0[s]['stepped']) for s in r0] == \
           [(r1[s]['n'], r1[s]['m'], r1[s]['lr'], r1[s]['stepped']) for s in r0]
    assert len({(r['n'], r['m']) for r in r0.values()}) > 3
    for r in (r0, r1):   # each rank's loss is on its own half of the batch: both finite, both falling
        assert all(rec['finite'] for rec in r.values())
        first, last = sum(r[s]['loss'] for s in range(1, 5)) / 4, sum(r[s]['loss'] for s in range(37, 41)) / 4
        assert last < first - 0.5
    assert 'on 2 rank(s)' in ref['log'] and '[resume]' not in ref['log']
    assert 'group_world_size=2' in ref['out_a'] and 'group_world_size=2' in ref['out_b']


def test_kill_node_hook_fires_only_at_its_step_and_only_under_torchrun(monkeypatch):
    from tests.hooked_train import FaultHooks
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    hooks = FaultHooks(kill_node_at_step=3)
    for step in (1, 2, 4):
        hooks.after_step(step)   # not its step: nothing happens
    with pytest.raises(SystemExit, match='torchrun'):   # never the parent of a plain `python train.py`: a shell
        hooks.after_step(3)


@pytest.mark.slow
def test_killed_worker_then_killed_node_both_resume_exactly(data, reference, tmp_path):
    """One run, two faults, both on node B (A hosts the rendezvous store, whose loss would end the run):
    1. --kill_at_step=14 SIGKILLs B's worker; B's torchrun restarts it, A's torchrun sees the new rendezvous round
       and restarts its worker too; both resume from the step-12 checkpoint.
    2. --kill_node_at_step=26: right after step 26 (of its restarted attempt) B's worker SIGKILLs B's torchrun and
       then itself (a lost node), and B is started again with the same command minus the hooks; A's worker fails
       on the dead peer, A's torchrun restarts it, the new B joins, and both resume from the last checkpoint
       (a multiple of 4, 24 or later). The kill is part of the run, so it happens at step 26 however loaded the
       machine is (a test that polled the logs for step 26 could see the run finish first).
    Steps after each checkpoint ran twice; read_steps keeps the last record, so the rerun ones are compared."""
    ref_out, ref = reference
    out = str(tmp_path / 'out')
    run = _run_two_nodes(data, out, 'faults', b_extra=('--kill_at_step=14', '--kill_node_at_step=26'),
                         restart_b=True)
    resumed = [int(line.split(': step ')[1].split()[0]) for line in run['log'].splitlines() if '[resume]' in line]
    assert len(resumed) == 2 and resumed[0] == 12, run['log'][-3000:]
    assert resumed[1] % 4 == 0 and 24 <= resumed[1] <= run['killed_at'] < STEPS, (resumed, run['killed_at'])
    assert 'Worker group FAILED. 3/3 attempts left' in run['out_b']   # fault 1: B's own torchrun restarted
    assert 'Worker group FAILED. 3/3 attempts left' in run['out_a']   # fault 2: A's worker lost its peer
    assert run['out_b'].count('Starting elastic_operator') == 2       # B was started twice
    _assert_same_run(run, ref, out, ref_out)


# ---------------------------------------------------------------- collective timeout

HUNG_PEER = """
import os, sys, time
import torch
sys.path.insert(0, os.environ['PYTHONPATH'])
import dist
dist.initialize('cpu')
if dist.get_rank() == 1:
    time.sleep(120)   # alive but never joins the collective: a hung peer
t0 = time.time()
try:
    dist.allreduce_sum(torch.ones(1))
except Exception as e:
    print(f'collective failed after {time.time() - t0:.1f} s ({type(e).__name__})', flush=True)
    os._exit(3)   # not sys.exit: gloo's destructor can abort on the timed-out work, which is not what is tested
"""


def test_timeout_comes_from_the_environment(monkeypatch):
    import dist
    monkeypatch.delenv('VIAR_DIST_TIMEOUT_S', raising=False)
    assert dist.timeout_from_env().total_seconds() == 30 * 60   # unchanged default
    monkeypatch.setenv('VIAR_DIST_TIMEOUT_S', '2.5')
    assert dist.timeout_from_env().total_seconds() == 2.5
    for bad in ('0', '-3', 'ten'):
        monkeypatch.setenv('VIAR_DIST_TIMEOUT_S', bad)
        with pytest.raises(SystemExit, match='VIAR_DIST_TIMEOUT_S'):
            dist.timeout_from_env()


@pytest.mark.slow
def test_hung_peer_fails_the_collective_after_viar_dist_timeout_s(tmp_path):
    script = tmp_path / 'hung_peer.py'
    script.write_text(HUNG_PEER)
    env = dict(env_one_thread(), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()),
               VIAR_DIST_TIMEOUT_S='3')
    peer = subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK='1', LOCAL_RANK='1'),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = run_group([sys.executable, str(script)], 90, env=dict(env, RANK='0', LOCAL_RANK='0'))
    finally:
        os.killpg(peer.pid, signal.SIGKILL)
        peer.wait()
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    waited = float(proc.stdout.split('after ')[1].split()[0])
    assert 2.5 <= waited < 20, proc.stdout   # seconds, not gloo's 30-minute default


# ---------------------------------------------------------------- SLURM, with fake srun/scontrol/sbatch

FAKE_SBATCH = r'''#!/usr/bin/env bash
# sbatch: run a spooled copy of the script in the background job's environment (2 nodes, job 4242)
set -e
script=$1; shift
mkdir -p "$FAKE_SPOOL" && cp "$script" "$FAKE_SPOOL/slurm_script"
export SLURM_JOB_ID=4242 SLURM_JOB_NAME=viar-d30 SLURM_JOB_NODELIST='gpu-node-[017-018]' SLURM_JOB_NUM_NODES=2 \
       SLURM_NNODES=2 SLURM_SUBMIT_DIR=$PWD SLURM_GPUS_ON_NODE=8 SLURM_CPUS_PER_TASK=64
echo "sbatch $script $*" >> "$SHIM_LOG"
exec bash "$FAKE_SPOOL/slurm_script" "$@"
'''
FAKE_SCONTROL = r'''#!/usr/bin/env bash
echo "scontrol $*" >> "$SHIM_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-017\ngpu-node-018\n'; fi
'''
FAKE_SRUN = r'''#!/usr/bin/env bash
# srun: log the options, then run the command once per node, as the real one does
echo "srun $*" >> "$SHIM_LOG"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
for node in gpu-node-017 gpu-node-018; do SLURMD_NODENAME=$node "$@" & done
wait
'''
FAKE_PYTHON = r'''#!/usr/bin/env bash
echo "python $* TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}" >> "$SHIM_LOG"
if [ -n "${FAKE_SLEEP:-}" ]; then sleep "$FAKE_SLEEP"; fi
'''


def _shims(tmp) -> Dict[str, str]:
    bin_dir = os.path.join(tmp, 'bin')
    os.makedirs(bin_dir)
    for name, text in (('sbatch', FAKE_SBATCH), ('scontrol', FAKE_SCONTROL), ('srun', FAKE_SRUN),
                       ('python', FAKE_PYTHON)):
        path = os.path.join(bin_dir, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, 0o755)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ['PATH'], SHIM_LOG=os.path.join(tmp, 'calls.log'),
               FAKE_SPOOL=os.path.join(tmp, 'spool'), PYTHON=os.path.join(bin_dir, 'python'),
               DATA_PATH='/data/imagenet')
    for k in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'RDZV_ID', 'RDZV', 'OUT', 'NPROC',
              'TORCH_DISABLE_SHARE_RDZV_TCP_STORE', 'SLURM_RESTART_COUNT'):
        env.pop(k, None)
    return env


def _calls(env, prefix: str) -> List[List[str]]:
    return [line.split()[1:] for line in open(env['SHIM_LOG']).read().splitlines() if line.startswith(prefix + ' ')]


def test_slurm_script_parses_and_lints():
    assert subprocess.run(['bash', '-n', SLURM_SH]).returncode == 0
    assert subprocess.run(['bash', '-n', TRAIN_SH]).returncode == 0
    text = open(SLURM_SH).read()
    for line in ('#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8', '#SBATCH --requeue',
                 '#SBATCH --signal=B:USR1@120', '#SBATCH --nodes=', '#SBATCH --time=', '#SBATCH --cpus-per-task='):
        assert line in text, line
    try:
        lint = subprocess.run(['shellcheck', SLURM_SH, TRAIN_SH], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip('shellcheck is not installed: SETUP_SYSTEM_PACKAGES=1 bash scripts/setup.sh installs it')
    assert lint.returncode == 0, lint.stdout


def test_slurm_script_starts_one_elastic_torchrun_per_node(tmp_path):
    env = _shims(str(tmp_path))
    for restart in ('0', '1'):   # a requeued job: same job id, so the same rendezvous id and output folder
        proc = run_group(['sbatch', SLURM_SH, '--save_every_steps=500'], 60, cwd=ROOT,
                         env=dict(env, SLURM_RESTART_COUNT=restart))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f'job 4242 (restart {restart}) on 2 node(s) x 8 GPU(s)' in proc.stdout
    srun = _calls(env, 'srun')
    assert srun[0][:4] == ['--nodes=2', '--ntasks=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1']
    assert '--cpus-per-task=64' in srun[0] and srun[0][-3:] == ['bash', 'scripts/train.sh', '--save_every_steps=500']
    assert ['show', 'hostnames', 'gpu-node-[017-018]'] in _calls(env, 'scontrol')
    runs = _calls(env, 'python')
    assert len(runs) == 4 and all(r == runs[0] for r in runs)   # 2 nodes x 2 starts, one command
    argv = runs[0]
    port = 20000 + 4242 % 20000
    launcher = argv[:argv.index('train.py')]
    assert launcher[:2] == ['-m', 'torch.distributed.run']
    assert set(launcher[2:]) == {'--nnodes=2', '--rdzv-backend=c10d', f'--rdzv-endpoint=gpu-node-017:{port}',
                                 '--rdzv-id=4242', '--max-restarts=3', '--nproc_per_node=8'}
    train_args = argv[argv.index('train.py') + 1:]
    assert {'--data_path=/data/imagenet', '--depth=30', '--bs=512', '--ep=550', '--use_implicit=True',
            '--local_out_dir_path=local_output/viar-d30'} <= set(train_args)
    assert train_args[-2:] == ['--save_every_steps=500', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1']


def test_slurm_script_requeues_itself_on_usr1(tmp_path):
    env = _shims(str(tmp_path))
    env['FAKE_SLEEP'] = '60'
    with subprocess.Popen(['sbatch', SLURM_SH], cwd=ROOT, env=env, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            t0 = time.time()
            while len(_calls(env, 'python') if os.path.exists(env['SHIM_LOG']) else []) < 2:
                assert time.time() - t0 < 30 and proc.poll() is None, 'the fake training never started'
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGUSR1)   # what SLURM sends 120 s before the time limit
            while ['requeue', '4242'] not in _calls(env, 'scontrol'):
                assert time.time() - t0 < 30, open(env['SHIM_LOG']).read()
                time.sleep(0.05)
            assert proc.poll() is None   # the batch shell still waits for srun (SLURM ends the steps)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
    assert 'USR1: time limit near, requeueing job 4242' in out


def test_train_sh_static_and_elastic_forms(tmp_path):
    env = _shims(str(tmp_path))

    def launcher(**kw):
        open(env['SHIM_LOG'], 'w').close()
        proc = run_group(['bash', TRAIN_SH, '--ep=1'], 30, cwd=ROOT, env=dict(env, **kw))
        argv = (_calls(env, 'python') or [[]])[0]
        return proc, argv[2:argv.index('train.py')] if 'train.py' in argv else argv

    proc, args = launcher()   # today's single-node command, unchanged
    assert args == ['--nnodes=1', '--node_rank=0', '--master_addr=127.0.0.1', '--master_port=7777',
                    '--nproc_per_node=8']
    proc, args = launcher(NNODES='2', NODE_RANK='1', MASTER_ADDR='node0', MASTER_PORT='9999', NPROC='4')
    assert args == ['--nnodes=2', '--node_rank=1', '--master_addr=node0', '--master_port=9999', '--nproc_per_node=4']
    proc, args = launcher(NNODES='1:4', RDZV='1', MASTER_ADDR='node0', MAX_RESTARTS='5', RDZV_CONF='join_timeout=9')
    assert args == ['--nnodes=1:4', '--rdzv-backend=c10d', '--rdzv-endpoint=node0:7777', '--rdzv-id=viar',
                    '--max-restarts=5', '--rdzv-conf=join_timeout=9', '--nproc_per_node=8']
    proc, args = launcher(NNODES='1:4')
    assert proc.returncode == 2 and 'needs the elastic form' in proc.stderr and args == []
