"""Errors while writing a run directory (disk full, read-only file system, a path that is a file) as one line.

An OSError deep inside torch.save or logging would end a run with a long traceback that hides the cause. Every
write to a run directory goes through `writing()`, which turns it into a `RunDirError` naming the path and the
cause; the command-line tools print that one line and exit with `RunDirError.exit_code`.
"""

import contextlib
import errno
import os

from .errors import UserError


class RunDirError(UserError, OSError):
    """The run directory cannot be written (an OSError underneath). Also an OSError, so code that already
    handles OSError keeps working."""

    exit_code = 3

    def __str__(self):
        return self.args[0] if self.args else ""


def _first_file_on_the_way(path):
    """The deepest existing ancestor of `path` that is not a directory (a LOG.PREFIX naming a file), or None."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path if path and not os.path.isdir(path) else None


def describe(error, what, path):
    """One line for the OSError `error` raised while doing `what` (e.g. "write checkpoint") on `path`."""
    cause = error.strerror or str(error)
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _first_file_on_the_way(path)
        if blocker is not None:
            return (f"cannot {what} {path}: {blocker} is a file, not a directory (check LOG.PREFIX / "
                    f"EXPERIMENT.NAME)")
    hint = {
        errno.ENOSPC: "free some space or set LOG.PREFIX to another disk",
        errno.EDQUOT: "free some space or set LOG.PREFIX to another disk",
        errno.EFBIG: "the file size limit (ulimit -f) is too low for it",
        errno.EROFS: "set LOG.PREFIX to a writable directory",
        errno.EACCES: "set LOG.PREFIX to a directory you may write to",
        errno.EPERM: "set LOG.PREFIX to a directory you may write to",
    }.get(error.errno)
    return f"cannot {what} {path}: {cause}{'; ' + hint if hint else ''}"


@contextlib.contextmanager
def writing(what, path):
    """Turn an OSError raised inside the block into a one-line RunDirError about `what` on `path`."""
    try:
        yield
    except RunDirError:
        raise
    except OSError as e:
        raise RunDirError(describe(e, what, path)) from e


LEFTOVER_SUFFIXES = (".tmp",)


def is_leftover(name):
    """A temporary file one of our atomic writes leaves only when killed mid-write (`.tmp-*.pth` from
    checkpoint.atomic_save, `<file>.tmp` from config.yaml / metrics.jsonl / summary.json)."""
    return (name.startswith(".tmp-") and name.endswith(".pth")) or name.endswith(LEFTOVER_SUFFIXES)


def remove_leftovers(path):
    """Delete the half-written temporary files in run directory `path`; returns their names. Only safe while
    holding the run's lock (another live run's temporary file would be in use)."""
    if not os.path.isdir(path):
        return []
    removed = []
    with writing("remove a half-written file in", path):
        for name in sorted(os.listdir(path)):
            if is_leftover(name) and os.path.isfile(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
                removed.append(name)
    return removed
