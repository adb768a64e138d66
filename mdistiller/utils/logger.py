"""The `mdistiller` logger: to train.log in the run directory and to the console without breaking tqdm bars."""

import logging

from tqdm import tqdm


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record))


def setup_logger(log_file=None, console=True):
    logger = logging.getLogger("mdistiller")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    if console:
        h = _TqdmHandler()
        h.setFormatter(fmt)
        logger.addHandler(h)
    if log_file:
        h = logging.FileHandler(log_file, mode="a")
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger
