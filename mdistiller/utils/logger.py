"""The `mdistiller` logger: to train.log in the run directory and to the console without breaking tqdm bars.

A run that fails its checks before training must leave train.log as it was, so the file can be held back:
`setup_logger(path, defer_file=True)` keeps the records in memory and `open_deferred_log()` writes them (with
their original times) and everything after, once the run is sure to start."""

import logging
from logging.handlers import MemoryHandler

from tqdm import tqdm

from .run_dir_io import writing


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record))


class _Deferred(MemoryHandler):
    """Holds records for a log file that is not opened yet."""

    def __init__(self, log_file):
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)
        self.log_file = log_file


_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")


def _file_handler(log_file):
    with writing("write log file", log_file):
        h = logging.FileHandler(log_file, mode="a")
    h.setFormatter(_FORMAT)
    return h


def setup_logger(log_file=None, console=True, defer_file=False):
    logger = logging.getLogger("mdistiller")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if console:
        h = _TqdmHandler()
        h.setFormatter(_FORMAT)
        logger.addHandler(h)
    if log_file:
        logger.addHandler(_Deferred(log_file) if defer_file else _file_handler(log_file))
    return logger


def open_deferred_log(logger=None):
    """Open the log file a `setup_logger(..., defer_file=True)` held back and write the held records to it."""
    logger = logger or logging.getLogger("mdistiller")
    for h in list(logger.handlers):
        if isinstance(h, _Deferred):
            target = _file_handler(h.log_file)
            h.setTarget(target)
            h.flush()
            logger.removeHandler(h)
            h.close()
            logger.addHandler(target)
