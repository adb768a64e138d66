"""Progress bars for the long steps (training, evaluation, KD++ class means, int8 calibration, data preparation).

A bar is drawn only on a terminal (stderr is a tty) and, under torchrun, by rank 0 alone: in a log file (CI,
redirected output, SLURM) a bar's carriage returns are noise, so there the training loop writes a log line every
LOG.PRINT_FREQ steps instead (engine/progress_log.py) and the other steps report when they finish.
"""

import sys

from tqdm import tqdm

from . import distributed

# Data preparation bars appear only once the step has run this long: quick steps print nothing.
PREPARATION_DELAY_S = 2.0


def on_terminal():
    """True when stderr, where tqdm draws, is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def show_bars(rank=None):
    """Whether this process draws bars: on a terminal, rank 0 only."""
    if not on_terminal():
        return False
    if rank is None:
        rank = distributed.rank()
    return rank == 0


def bar(iterable=None, desc=None, total=None, unit="it", show=None, **kwargs):
    """A tqdm bar that clears itself when done (leave=False) and is disabled off a terminal / off rank 0.

    `show` overrides the decision (None: show_bars()). A `total` of None is taken from len(iterable) when it
    has one."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                disable=not (show_bars() if show is None else show), **kwargs)


def preparation_bar(iterable=None, desc=None, total=None, unit="file", show=None, **kwargs):
    """A data-preparation bar (hashing, sorting files), drawn only once the step has taken a few seconds."""
    return bar(iterable, desc=desc, total=total, unit=unit, show=show, delay=PREPARATION_DELAY_S, **kwargs)


def byte_bar(total, desc, show=None):
    """A data-preparation bar counting bytes (hashing a big file)."""
    return preparation_bar(desc=desc, total=total, unit="B", show=show, unit_scale=True, unit_divisor=1024)
