"""What a training run does at each step, as pure functions of the step: the policy half of `train.Run.train`.

`schedule_at(g_it)` gives forward pass g_it's lr, weight decay and progressive stage; `events_at(done, pending)`
whether to log, validate and save. Validation and saving wait for an optimizer-step boundary (every `ac` forward
passes): one asked for inside an accumulation window is carried in `pending`.
"""
from dataclasses import dataclass
from typing import Tuple

from utils.train.lr_control import lr_ratio, prog_stage, wd_at


@dataclass(frozen=True)
class StepSchedule:
    """The hyper-parameters of one forward pass."""
    lr: float
    wd: float
    prog_si: int          # progressive training: last scale trained (-1: all)
    stepping: bool        # the optimizer steps after this forward pass (end of an accumulation window)


@dataclass(frozen=True)
class Pending:
    """Validation / saving asked for inside an accumulation window, done at its end."""
    validate: bool = False
    save: bool = False


@dataclass(frozen=True)
class Events:
    """What to do after a forward pass."""
    log: bool = False
    validate: bool = False
    save: bool = False


@dataclass(frozen=True)
class StepPolicy:
    """Everything the step policy depends on (all in forward passes unless said otherwise)."""
    total: int                 # forward passes of the whole run
    iters_ep: int              # forward passes per epoch
    ac: int                    # forward passes per optimizer step
    peak_lr: float
    wd: float
    wd_end: float
    sche: str
    wp_it: float               # warmup length
    wp0: float
    wpe: float
    pg: float                  # progressive training fraction (0: off)
    pg0: int
    num_scales: int
    save_freq: int             # epochs between validate + save
    save_every_steps: int      # optimizer steps between saves (0: off)
    val_every: int             # forward passes between validations (0: off)
    log_every: int             # forward passes between progress lines

    def schedule_at(self, g_it: int) -> StepSchedule:
        """lr, wd, progressive stage and whether the optimizer steps, at forward pass g_it (0-based)."""
        return StepSchedule(
            lr=self.peak_lr * lr_ratio(self.sche, g_it, self.wp_it, self.total, self.wp0, self.wpe),
            wd=wd_at(self.wd, self.wd_end, g_it, self.total),
            prog_si=prog_stage(g_it, self.wp_it, self.total, self.pg, self.pg0, self.num_scales),
            stepping=(g_it + 1) % self.ac == 0)

    def events_at(self, done: int, pending: Pending = Pending(), first: bool = False) -> Tuple[Events, Pending]:
        """After `done` forward passes (from 1): log / validate / save now, and what stays pending. first: the first
        pass of this process (a progress line right away, also after a resume)."""
        ep, it = divmod(done - 1, self.iters_ep)
        last = done == self.total
        epoch_end = it + 1 == self.iters_ep or last
        save_epoch = epoch_end and ((ep + 1) % self.save_freq == 0 or last)
        validate = pending.validate or save_epoch or (self.val_every > 0 and done % self.val_every == 0)
        save = pending.save or save_epoch or (self.save_every_steps > 0 and done % self.ac == 0
                                              and (done // self.ac) % self.save_every_steps == 0)
        log = done % self.log_every == 0 or last or first
        if done % self.ac == 0 or last:   # only at optimizer-step boundaries
            return Events(log, validate, save), Pending()
        return Events(log), Pending(validate, save)


def default_log_every(iters_ep: int) -> int:
    """About 20 progress lines per epoch, at most every 100 forward passes, at least every one."""
    return max(1, min(100, iters_ep // 20))
