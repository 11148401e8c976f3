"""train.py with fault injection, for the kill/resume and non-finite tests: `python tests/hooked_train.py FLAGS`.

Besides train.py's flags it takes (steps numbered from 1, as in the logs):
  --nan_at_steps 3_4_5 | 3-9   make the loss of these steps NaN
  --kill_at_step N             SIGKILL this process right after step N (not after a torchrun restart)
  --kill_node_at_step N        right after step N, SIGKILL this worker's torchrun agent and then this process: a lost
                               node (in any torchrun attempt, since no agent survives to restart it)
and installs them through train.main's `hooks` (trainer.StepHooks).
"""
import argparse
import logging
import os
import re
import signal
import sys
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script: the repo root

import train   # noqa: E402
from trainer import StepHooks   # noqa: E402


def parse_steps(text: str) -> Tuple[int, ...]:
    """'3_4_5' or '3,4' -> (3, 4, 5); 'a-b' -> every step in [a, b]."""
    text = text.strip()
    if not text:
        return ()
    try:
        if '-' in text:
            a, b = (int(t) for t in text.split('-'))
            return tuple(range(a, b + 1))
        return tuple(int(t) for t in re.split(r'[_,]', text) if t)
    except ValueError:
        raise SystemExit(f"--nan_at_steps must look like 3_4_5 or 3-9, got {text!r}") from None


class FaultHooks(StepHooks):
    """NaN losses at nan_steps; SIGKILL after kill_at_step (first torchrun attempt only) or, with the torchrun agent
    first, after kill_node_at_step."""

    def __init__(self, nan_steps: Tuple[int, ...] = (), kill_at_step: int = -1, kill_node_at_step: int = -1):
        self.nan_steps, self.kill_at_step, self.kill_node_at_step = nan_steps, kill_at_step, kill_node_at_step
        self.log = logging.getLogger('viar.train')   # the run's logger (utils.logging_util.get_logger('train'))

    def loss(self, step, loss):
        return loss * float('nan') if step in self.nan_steps else loss

    def after_step(self, step):
        if step == self.kill_at_step and int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) == 0:
            self.log.warning(f'[test hook] SIGKILL after step {step}')
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.kill_node_at_step:
            # the agent first, so that it never sees this worker die and restarts nothing: the node is gone whole
            if 'TORCHELASTIC_RUN_ID' not in os.environ:
                raise SystemExit('--kill_node_at_step kills the torchrun agent that started this worker; '
                                 'without torchrun it would kill your shell')
            agent = os.getppid()
            self.log.warning(f'[test hook] SIGKILL the torchrun agent (pid {agent}) and this worker after step '
                             f'{step}: a lost node')
            os.kill(agent, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def split_argv(argv: List[str]) -> Tuple[FaultHooks, List[str]]:
    """(the hooks these flags ask for, train.py's own flags)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument('--nan_at_steps', default='')
    p.add_argument('--kill_at_step', type=int, default=-1)
    p.add_argument('--kill_node_at_step', type=int, default=-1)
    ns, rest = p.parse_known_args(argv)
    return FaultHooks(parse_steps(ns.nan_at_steps), ns.kill_at_step, ns.kill_node_at_step), rest


def main(argv: Optional[List[str]] = None):
    """train.main with the hooks of the fault flags."""
    hooks, rest = split_argv(sys.argv[1:] if argv is None else list(argv))
    train.main(rest, hooks=hooks)


if __name__ == '__main__':
    main()
