"""One process per run directory: an exclusive OS lock on `<run dir>/.lock`, held for the whole run.

Two runs with the same run name started together would otherwise write into one directory (interleaved epochs
in metrics.jsonl, one run's summary over the other's metrics). The lock is a POSIX record lock (fcntl.lockf),
which NFS supports through its lock manager where flock may not; the OS drops it when the process dies, so a
killed run never leaves a stale lock behind. The file records the holder (host, pid, start time) so that the
refused run can name it. The file itself stays: deleting it would let a process still holding the old file's
lock and a newcomer holding a new file's lock run together.
"""

import errno
import fcntl
import json
import logging
import os
import socket
import time

from .errors import UserError
from .run_dir_io import RunDirError, writing

LOCK_NAME = ".lock"
_held_here = set()  # POSIX locks do not exclude the process holding them: refuse a second run in this process


class RunLockedError(UserError):
    """Another live process holds the run directory."""

    exit_code = 4


def _holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        info = json.loads(text)
        return (f"pid {info['pid']} on host {info['host']}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


class RunLock:
    """`RunLock(run_dir).acquire()` creates the directory if needed and takes the lock, or raises
    RunLockedError naming the holder; `release()` frees it and, when this lock created the directory and
    nothing else was written there (the run stopped before it started), removes the directory again."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.file = os.path.join(run_dir, LOCK_NAME)
        self.fd = None
        self.created_dir = False

    def acquire(self):
        key = os.path.realpath(self.run_dir)
        if key in _held_here:
            raise RunLockedError(f"run directory {self.run_dir} is in use by this process (pid {os.getpid()}); "
                                 f"wait for that run to end or give this one another EXPERIMENT.NAME")
        while True:
            if not os.path.isdir(self.run_dir):
                self.created_dir = True
            with writing("create run directory", self.run_dir):
                os.makedirs(self.run_dir, exist_ok=True)
            with writing("create the lock file", self.file):
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    holder = _holder(fd)
                    os.close(fd)  # the directory is the holder's to remove, not ours
                    raise RunLockedError(
                        f"run directory {self.run_dir} is in use by {holder} (lock {self.file}); wait for that run "
                        f"to end, or start this one under another EXPERIMENT.NAME / EXPERIMENT.TAG / LOG.PREFIX"
                    ) from None
                # A file system without locks (some FUSE mounts): run unlocked rather than not at all.
                logging.getLogger("mdistiller").warning("cannot lock %s (%s); running without a lock",
                                                        self.file, e.strerror)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced while we waited for it: lock the current one
        self.fd = fd
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        try:
            with writing("write the lock file", self.file):
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode() + b"\n", 0)
        except RunDirError:
            self.release()
            raise
        _held_here.add(key)
        self.key = key
        return self

    def _undo_dir(self):
        """Remove the run directory this lock created if nothing but the lock file is in it."""
        if not self.created_dir:
            return
        try:
            if set(os.listdir(self.run_dir)) <= {LOCK_NAME}:
                if os.path.exists(self.file):
                    os.remove(self.file)
                os.rmdir(self.run_dir)
        except OSError:
            pass

    def release(self):
        if self.fd is None:
            return
        _held_here.discard(getattr(self, "key", None))
        self._undo_dir()  # before unlocking: nobody else can be using the directory yet
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

