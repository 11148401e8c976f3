"""The project's one logging style (`get_logger`) and tensorboard scalars (`ScalarWriter`); on ranks other than
the master both do nothing, so call sites need no rank checks.
"""
import logging
import os
import socket
import sys
import time
from typing import Dict, List, Optional


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout (or sys.stderr) is when each record is emitted, so redirections made after
    the logger was set up (pytest's capture, a script's own redirect) still see the lines."""

    def __init__(self, to_stderr: bool = False):
        super().__init__()
        self.to_stderr = to_stderr

    def emit(self, record):
        self.stream = sys.stderr if self.to_stderr else sys.stdout
        super().emit(record)


def get_logger(name: str, out_dir: Optional[str] = None, is_master: bool = True, timestamps: bool = False,
               to_stderr: bool = False) -> logging.Logger:
    """'[name] message' (with timestamps: '[time name] message') on the console and, with out_dir, appended to
    out_dir/log.txt; silent unless is_master. Called again for a name, it replaces that logger's handlers."""
    lg = logging.getLogger(f'viar.{name}')
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    lg.propagate = False
    lg.setLevel(logging.INFO)
    if not is_master:
        lg.addHandler(logging.NullHandler())
        return lg
    fmt = logging.Formatter(f'[%(asctime)s {name}] %(message)s' if timestamps else f'[{name}] %(message)s',
                            datefmt='%m-%d %H:%M:%S')
    handlers: List[logging.Handler] = [_ConsoleHandler(to_stderr)]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(out_dir, 'log.txt')))
    for h in handlers:
        h.setFormatter(fmt)
        lg.addHandler(h)
    return lg


class ScalarWriter:
    """Tensorboard scalars on the master rank; a no-op elsewhere or when tensorboard is missing. tensorboard's
    RecordWriter on a plain file, because SummaryWriter imports TensorFlow when it is installed (for the evaluator):
    seconds at start-up and a GPU probe."""

    def __init__(self, log_dir: Optional[str]):
        self.tb = None
        if log_dir:
            try:   # tensorboard is optional (and slow to import): imported only when scalars are written
                from tensorboard.summary.writer.record_writer import RecordWriter
                from tensorboard.compat.proto.event_pb2 import Event
            except ImportError:
                logging.getLogger('viar').warning('tensorboard is not installed: no tensorboard scalars are written')
                return
            os.makedirs(log_dir, exist_ok=True)
            name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
            self.tb = RecordWriter(open(os.path.join(log_dir, name), 'wb'))
            self.tb.write(Event(wall_time=time.time(), file_version='brain.Event:2').SerializeToString())

    def add(self, head: str, scalars: Dict[str, Optional[float]], step: int):
        """Write head/name = value for every value that is not None."""
        if self.tb is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        values = [Summary.Value(tag=f'{head}/{k}', simple_value=float(v)) for k, v in scalars.items() if v is not None]
        if values:
            event = Event(wall_time=time.time(), step=int(step), summary=Summary(value=values))
            self.tb.write(event.SerializeToString())

    def flush(self):
        """Flush pending events."""
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        """Flush and close."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_duration(seconds: float) -> str:
    """12345 -> '3:25:45'; days are written as '2d 03:25:45'."""
    seconds = max(0, int(round(seconds)))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f'{d}d {h:02d}:{m:02d}:{s:02d}' if d else f'{h}:{m:02d}:{s:02d}'
