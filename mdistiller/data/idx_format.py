"""Reader for the IDX format of (Fashion-)MNIST, gzip'd or not.

Parsed here rather than through torchvision so that the Debian-packaged files can be used in place, without
copying them into torchvision's directory layout; a bad header becomes a DataError naming the file.
"""

import gzip

import numpy as np
import torch

from ..utils.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path, expect_ndim=None):
    """The array stored in an IDX file as a torch tensor (uint8 stays uint8)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                        "the download is corrupt - delete it and fetch it again")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path} holds a {ndim}-d array, expected {expect_ndim}-d; is it the right file?")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if ndim else ()
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise DataError(f"{path} is truncated or corrupt: header says {shape}, "
                        f"file has {len(raw) - header} data bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))
