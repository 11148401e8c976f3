"""Test hooks of a training run, in one object: poison a step's loss, kill the process after a step.

They exist so the tests can check the non-finite-loss policy and exact resume after a SIGKILL through
the real `train.py`; a training run leaves them off. The trainer asks `poisons(step)`; the run loop calls
`after_step(step)`. Steps are numbered from 1, as in the logs.
"""
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Tuple

from utils.cli import flag


@dataclass
class TrainHookArgs:
    """Test hooks (leave off in real runs)."""
    kill_at_step: int = flag(-1, 'test hook: SIGKILL this process right after step N (from 1; not after a torchrun '
                                 'restart; -1: off)')
    nan_at_steps: str = flag('', 'test hook: make the loss NaN at these steps (from 1), e.g. 3_4_5 or 3-9')
    kill_node_at_step: int = flag(-1, 'test hook: right after step N (from 1), SIGKILL this worker\'s parent torchrun '
                                      'agent and then this process, a lost node; fires in any torchrun attempt, since '
                                      'no agent survives to restart it (relaunch the node without the flag); -1: off')


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


@dataclass
class TrainHooks:
    """The hooks a run applies: steps whose loss is made NaN, and the step after which the process dies."""
    nan_steps: Tuple[int, ...] = ()
    kill_at_step: int = -1
    log: object = field(default=None, repr=False)
    kill_node_at_step: int = -1

    @classmethod
    def from_args(cls, a: TrainHookArgs, log=None) -> 'TrainHooks':
        return cls(parse_steps(a.nan_at_steps), a.kill_at_step, log, a.kill_node_at_step)

    def poisons(self, step: int) -> bool:
        """Whether step `step`'s loss is to be made NaN."""
        return step in self.nan_steps

    def after_step(self, step: int):
        """SIGKILL this process after step `kill_at_step`, except after a torchrun restart (which would otherwise
        kill every attempt); after step `kill_node_at_step`, SIGKILL the torchrun agent and then this process."""
        if step == self.kill_at_step and int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) == 0:
            if self.log is not None:
                self.log.warning(f'[test hook] SIGKILL after step {step}')
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.kill_node_at_step:
            # the agent first, so that it never sees this worker die and restarts nothing: the node is gone whole
            if 'TORCHELASTIC_RUN_ID' not in os.environ:
                raise SystemExit('--kill_node_at_step kills the torchrun agent that started this worker; '
                                 'without torchrun it would kill your shell')
            agent = os.getppid()
            if self.log is not None:
                self.log.warning(f'[test hook] SIGKILL the torchrun agent (pid {agent}) and this worker after step '
                                 f'{step}: a lost node')
            os.kill(agent, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
