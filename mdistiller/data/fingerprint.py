"""A fingerprint of the dataset files a run read, for the reproducibility ledger in summary.json.

Two runs with the same config hash, code and fingerprint saw the same bytes. For a file (Fashion-MNIST's IDX
files, CIFAR-100's pickles) the content is hashed. For a folder (ImageNet, Tiny-ImageNet splits) hashing
hundreds of GB would cost more than an epoch, so the listing is hashed instead: every file's path relative to
the folder and its size, which catches missing, extra, renamed and truncated images but not an in-place edit of
the same size.

    fingerprint = sha256 over the sources in order of  basename(source) + ":" + sha256(content or listing)
"""

import hashlib
import os
import time

from ..utils.progress import byte_bar, preparation_bar

# (path, size, mtime) -> digest: the main job reads the same files for every run, and a run hashes its teacher
# checkpoint twice (KD++'s class-means cache key, the summary.json ledger): each file is read once per process.
_CACHE = {}
# File timestamps are coarse (a kernel tick, or seconds on some file systems): a file rewritten with the same size
# just after it was hashed can keep its mtime. Only files last written longer ago than this are remembered.
_SETTLED_NS = 3_000_000_000


def file_sha256(path, chunk=1 << 20):
    """SHA-256 hex digest of a file's content, read in chunks (also what keys KD++'s class-means cache).

    Remembered per (absolute path, size, mtime) once the file has settled: a rewrite gets a new mtime."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f, byte_bar(st.st_size, f"sha256 {os.path.basename(path)}") as progress:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
            progress.update(len(block))
    if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
        _CACHE[key] = h.hexdigest()
    return h.hexdigest()


def _folder_digest(path):
    entries = []
    with preparation_bar(desc=f"listing {os.path.basename(os.path.normpath(path))}") as progress:
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in filenames:
                full = os.path.join(dirpath, name)
                entries.append(f"{os.path.relpath(full, path)}\t{os.path.getsize(full)}")
            progress.update(len(filenames))
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def fingerprint(sources):
    """sha256 hex digest of the sources (see the module docstring); "" when there are none."""
    if not sources:
        return ""
    h = hashlib.sha256()
    for source in sources:
        digest = _folder_digest(source) if os.path.isdir(source) else file_sha256(source)
        h.update(f"{os.path.basename(os.path.normpath(source))}:{digest}\n".encode())
    return h.hexdigest()
