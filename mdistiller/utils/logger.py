"""The `mdistiller` logger: to train.log in the run directory and to the console without breaking tqdm bars.

A run that fails its checks before training must leave train.log as it was, so the file can be held back:
`setup_logger(path, defer_file=True)` keeps the records in memory and `open_deferred_log()` writes them (with
their original times) and everything after, once the run is sure to start.

Everything a run prints goes to train.log too: messages of steps that also run outside a run (KD++'s class
means) go through `info()`, which logs while a run's logger is set up and prints to stderr otherwise, and Python
warnings raised while it is set up are written to train.log as well (still shown on the console as before).
`close_logger()` ends the run's logging: files closed, warnings as before, the logger back to its defaults."""

import logging
import sys
import warnings
from logging.handlers import MemoryHandler

from tqdm import tqdm

from .run_dir_io import writing


# Records of this child logger go to train.log only: what it carries was already shown on the console.
FILE_ONLY = "mdistiller.file_only"


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        if record.name != FILE_ONLY:
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


_shown_before = None  # warnings.showwarning while a run's logger routes warnings to its file


def to_file(level, msg, *args):
    """`msg` to the run's train.log alone, for what the console shows anyway; nothing when no run's log is set
    up (the record must not reach Python's last-resort handler, which would print it a second time)."""
    if logging.getLogger("mdistiller").handlers:
        logging.getLogger(FILE_ONLY).log(level, msg, *args)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    to_file(logging.WARNING, "%s:%d: %s: %s", filename, lineno, category.__name__, message)
    (_shown_before or warnings._showwarning_orig)(message, category, filename, lineno, file, line)


def _route_warnings(on):
    global _shown_before
    if on and warnings.showwarning is not _show_warning:
        _shown_before, warnings.showwarning = warnings.showwarning, _show_warning
    elif not on and warnings.showwarning is _show_warning:
        warnings.showwarning, _shown_before = _shown_before, None


def setup_logger(log_file=None, console=True, defer_file=False):
    """The run's logger: console (tqdm-safe) and/or `log_file` (held in memory with defer_file); a process
    without either (a DDP rank other than 0) gets a silent one. Warnings go to `log_file` until close_logger()."""
    logger = logging.getLogger("mdistiller")
    close_logger(logger)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if console:
        h = _TqdmHandler()
        h.setFormatter(_FORMAT)
        logger.addHandler(h)
    if log_file:
        logger.addHandler(_Deferred(log_file) if defer_file else _file_handler(log_file))
        _route_warnings(True)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())  # a run is set up (see info()), it just says nothing here
    return logger


def close_logger(logger=None):
    """End a run's logging: close its files, stop routing warnings, leave the logger as Python made it."""
    logger = logger or logging.getLogger("mdistiller")
    _route_warnings(False)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def info(message):
    """`message` to the run's log (console and train.log) while a run's logger is set up, else to stderr: for
    steps that also run outside a training run (tools/compute_class_means.py)."""
    logger = logging.getLogger("mdistiller")
    if logger.handlers:
        logger.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


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
