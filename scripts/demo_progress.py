"""Progress lines for scripts/demo.sh while a stage runs: steps done / total and an ETA, read from the stage's logs.

    python scripts/demo_progress.py --every 30 --t0 START --stage 3/5 VIAR=demo_output/viar.stdout VAR=...

Every --every seconds, one line per unfinished log: its last step or tqdm count, the share done and the time
left at the rate so far. Runs until killed or its shell has gone. Standard library only: it starts at once.
"""
import argparse
import os
import re
import sys
import time
from typing import Optional, Tuple

STEP_RE = re.compile(r'\bstep (\d+)/(\d+)\b')   # train.py / train_tokenizer.py: '... step 120/500 loss ...'
TQDM_RE = re.compile(r'\b(\d+)/(\d+) \[')         # a tqdm bar: ' 40%|####      | 200/500 [00:10<00:15, ...'
TAIL_BYTES = 16384                                 # the last progress line sits near the end of a log


# ----------------------------------------------------------------------------- pure helpers
def last_progress(text: str) -> Optional[Tuple[int, int, str]]:
    """(done, total, unit) of the last step count ('step') or tqdm count ('images') in a log's text, else None."""
    for pattern, unit in ((STEP_RE, 'step'), (TQDM_RE, 'images')):
        found = pattern.findall(text)
        if found:
            done, total = found[-1]
            return int(done), int(total), unit
    return None


def format_duration(seconds: float) -> str:
    """'45s', '3m20s', '1h02m'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    return f'{s // 3600}h{s % 3600 // 60:02d}m'


def eta_seconds(done: int, total: int, elapsed_s: float) -> Optional[float]:
    """Seconds left at the average rate so far (the stage's start-up counts as work), None before the first step."""
    if done <= 0 or total <= 0:
        return None
    return elapsed_s * max(total - done, 0) / done


def progress_line(name: str, done: Optional[int], total: Optional[int], elapsed_s: float, unit: str = 'step') -> str:
    """One progress line, e.g. 'VIAR: step 120/500 (24%), 2m30s in, ETA 7m55s'; before any count is logged,
    'VIAR: starting, 12s in'."""
    if done is None or total is None:
        return f'{name}: starting, {format_duration(elapsed_s)} in'
    pct = 100 * done / total if total else 100.0
    line = f'{name}: {unit} {done}/{total} ({pct:.0f}%), {format_duration(elapsed_s)} in'
    if done >= total:
        return line + ', finished'
    eta = eta_seconds(done, total, elapsed_s)
    return line + (f', ETA {format_duration(eta)}' if eta is not None else '')


# ----------------------------------------------------------------------------- the loop
def read_tail(path: str, nbytes: int = TAIL_BYTES) -> str:
    """The last nbytes of a file as text ('' when it does not exist yet)."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''


def parse_log(item: str) -> Tuple[str, str]:
    """'NAME=PATH' -> (name, path)."""
    name, sep, path = item.partition('=')
    if not (sep and name and path):
        raise SystemExit(f'demo_progress: expected NAME=PATH, got {item!r}')
    return name, path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--every', type=float, default=30.0, help='seconds between progress lines')
    p.add_argument('--t0', type=float, default=None, help="Unix time the demo began (for the '[demo Ns]' prefix)")
    p.add_argument('--stage', default='', help="the stage's tag, e.g. '3/5'")
    p.add_argument('logs', nargs='+', help='NAME=PATH of each log to read')
    args = p.parse_args(argv)
    logs = [parse_log(item) for item in args.logs]
    start, parent = time.time(), os.getppid()
    t0 = start if args.t0 is None else args.t0
    tag = f'{args.stage} ' if args.stage else ''
    named, finished = set(), set()
    while len(finished) < len(logs):
        time.sleep(args.every)
        if os.getppid() != parent:   # the demo ended (or was killed) without stopping this watcher
            return
        now = time.time()
        for name, path in logs:
            if path in finished:
                continue
            done, total, unit = last_progress(read_tail(path)) or (None, None, '')
            line = progress_line(name, done, total, now - start, unit)
            if done is not None and done >= total:
                finished.add(path)
            if path not in named:
                line += f' (log: {path})'
                named.add(path)
            print(f'[demo {now - t0:.0f}s] {tag}{line}', flush=True)


if __name__ == '__main__':
    sys.exit(main())
