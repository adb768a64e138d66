"""CIFAR-100 in its published on-disk format, written from tensors, and a torchvision reader for such copies.

The torchvision baseline must read its images the way a plain PyTorch user's script does - through
torchvision.datasets.CIFAR100 - yet train on the same images as the mdistiller variant, which with --synthetic
are generated. So the generated splits are written as <root>/cifar-100-python/{train,test,meta}, exactly the
layout of the published archive:

  train / test: {"batch_label", "filenames", "fine_labels", "coarse_labels", "data": uint8 N x 3072}, each row
                the 1024 red, then green, then blue values of a 32 x 32 image in row-major order (CHW);
  meta:         {"fine_label_names": 100 names, "coarse_label_names": 20 names}.

The published files are Python 2 pickles whose keys and names are py2 `str`. Readers rely on that: torchvision
unpickles with encoding="latin1" and indexes entry["data"], mdistiller's reader (data/cifar100.py) uses
encoding="bytes" and entry[b"data"]. A Python 3 pickle of either str or bytes keys satisfies only one of them, so
the writer emits every bytes object as a py2 str opcode (BINSTRING), which each reader decodes its own way.
"""

import os
import pickle
import struct

import numpy as np
from torchvision.datasets import CIFAR100

FOLDER = CIFAR100.base_folder  # "cifar-100-python"


class _Py2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing `bytes` as Python 2 `str` (what the published CIFAR files contain)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _entry(split, name, batch_label):
    images = split.images.cpu().numpy()
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"CIFAR-100 images are uint8 N x 3 x 32 x 32, got {images.dtype} {images.shape}")
    fine = [int(c) for c in split.targets.cpu().tolist()]
    if fine and not 0 <= min(fine) <= max(fine) < 100:
        raise ValueError("CIFAR-100 labels must lie in 0..99")
    return {b"batch_label": batch_label.encode(),
            b"filenames": [f"synthetic_{name}_{i:06d}.png".encode() for i in range(len(fine))],
            b"fine_labels": fine,
            b"coarse_labels": [c // 5 for c in fine],  # 20 superclasses; the real grouping is not contiguous
            b"data": np.ascontiguousarray(images.reshape(len(fine), 3 * 32 * 32))}


def write_cifar100(root, train, test):
    """Write TensorSplits `train` and `test` (uint8 N x 3 x 32 x 32, labels 0..99) under root; returns root."""
    directory = os.path.join(root, FOLDER)
    os.makedirs(directory, exist_ok=True)
    _dump(_entry(train, "train", "training batch 1 of 1"), os.path.join(directory, "train"))
    _dump(_entry(test, "test", "testing batch 1 of 1"), os.path.join(directory, "test"))
    _dump({b"fine_label_names": [f"class_{c:02d}".encode() for c in range(100)],
           b"coarse_label_names": [f"superclass_{c:02d}".encode() for c in range(20)]},
          os.path.join(directory, "meta"))
    return root


class UncheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR100 without its MD5 checks, for copies written by `write_cifar100`.

    torchvision accepts a CIFAR-100 folder only if each file has the published archive's MD5, which a copy holding
    other (synthetic) images cannot have. Everything else - reading the pickles, the HWC conversion, a PIL image
    per sample, the transforms - is torchvision's own code; check_integrity with md5 None only checks that the
    file exists."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}
