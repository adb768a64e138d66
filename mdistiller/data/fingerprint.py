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

_CACHE = {}  # (path, size, mtime) -> digest: the main job reads the same files for every run


def file_sha256(path, chunk=1 << 20):
    """SHA-256 hex digest of a file's content, read in chunks (also what keys KD++'s class-means cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _file_digest(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = file_sha256(path)
    return _CACHE[key]


def _folder_digest(path):
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            entries.append(f"{os.path.relpath(full, path)}\t{os.path.getsize(full)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def fingerprint(sources):
    """sha256 hex digest of the sources (see the module docstring); "" when there are none."""
    if not sources:
        return ""
    h = hashlib.sha256()
    for source in sources:
        digest = _folder_digest(source) if os.path.isdir(source) else _file_digest(source)
        h.update(f"{os.path.basename(os.path.normpath(source))}:{digest}\n".encode())
    return h.hexdigest()
