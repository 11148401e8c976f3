"""Rank-0 logging: a `logging` logger to stdout and <out>/log.txt, and tensorboard scalars.

Other ranks get a logger with a NullHandler and a writer that does nothing, so call sites need no
rank checks.
"""
import logging
import os
import socket
import sys
import time
from typing import Dict, Optional

LOGGER_NAME = 'viar.train'


def setup_logger(out_dir: str, is_master: bool, filename: str = 'log.txt') -> logging.Logger:
    """The training logger: stdout + out_dir/filename on the master rank, silent elsewhere."""
    lg = logging.getLogger(LOGGER_NAME)
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    lg.propagate = False
    lg.setLevel(logging.INFO)
    if not is_master:
        lg.addHandler(logging.NullHandler())
        return lg
    fmt = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%m-%d %H:%M:%S')
    os.makedirs(out_dir, exist_ok=True)
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(out_dir, filename))):
        h.setFormatter(fmt)
        lg.addHandler(h)
    return lg


def get_logger() -> logging.Logger:
    """The logger set up by setup_logger (silent until then)."""
    return logging.getLogger(LOGGER_NAME)


class ScalarWriter:
    """Tensorboard scalars on the master rank; a no-op elsewhere or when tensorboard is missing.

    Writes the event file with tensorboard's RecordWriter on a plain local file: torch's SummaryWriter
    (and tensorboard's EventFileWriter) import TensorFlow when it is installed, as it is here for the
    evaluator, which costs seconds at start-up and a GPU probe.
    """

    def __init__(self, log_dir: Optional[str]):
        self.tb = None
        if log_dir:
            try:
                from tensorboard.summary.writer.record_writer import RecordWriter
                from tensorboard.compat.proto.event_pb2 import Event
            except ImportError:
                get_logger().warning('tensorboard is not installed: no tensorboard scalars will be written')
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
