"""CIFAR-100 from torchvision's on-disk format (<ROOT>/cifar-100-python/{train,test,meta}).

The pickles are read directly (one numpy reshape each) instead of through torchvision's dataset class, which
would convert every image to PIL and back; only a missing copy goes through torchvision's download.
"""

import os
import pickle
import shutil
import urllib.parse
import urllib.request

import numpy as np
import torch

from ..utils.errors import DataError
from .bundle import DatasetBundle, TensorSplit
from .registry import DATASET_REGISTRY

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
NUM_CLASSES = 100
FOLDER = "cifar-100-python"


def _how_to_get(directory):
    return (f"expected the CIFAR-100 python files train, test and meta in {directory}/; get them by running "
            f"once with internet access and DATASET.DOWNLOAD True, or download "
            f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and unpack it in "
            f"{os.path.dirname(directory) or '.'}")


def _fetch(url, root, filename, md5):
    """torchvision's downloader, except for file:// URLs (a local mirror), which it cannot read: those are
    copied, then checked and unpacked by the same torchvision helpers."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

    if not url.startswith("file://"):
        download_and_extract_archive(url, root, filename=filename, md5=md5)
        return
    archive = os.path.join(root, filename)
    shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), archive)
    if not check_integrity(archive, md5):
        raise RuntimeError(f"{archive} does not have the expected MD5 {md5}")
    extract_archive(archive, root)


def _download(root, directory):
    """torchvision's URL and checksum (class attributes, so tests can point them at a local mirror)."""
    from torchvision.datasets import CIFAR100

    try:
        os.makedirs(root, exist_ok=True)
        _fetch(CIFAR100.url, root, CIFAR100.filename, CIFAR100.tgz_md5)
    except Exception as e:  # URLError, HTTPError, checksum RuntimeError, tarfile errors...
        raise DataError(f"CIFAR-100 download from {CIFAR100.url} failed ({type(e).__name__}: {e}); "
                        + _how_to_get(directory)) from None


def _check_keys(entry, path):
    """The published pickles are dicts with bytes keys (b"data", b"fine_labels"); anything else is one line."""
    redo = f"delete {os.path.dirname(path) or '.'} and download or unpack cifar-100-python.tar.gz again"
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, not the dict of a CIFAR-100 python pickle; {redo}")
    for key in (b"data", b"fine_labels"):
        if key in entry:
            continue
        if key.decode() in entry:
            raise DataError(f"{path} has str keys ('{key.decode()}') where the CIFAR-100 python files have bytes keys "
                            f"(b'{key.decode()}'): it was re-saved by another program, not the original file; {redo}")
        found = ", ".join(sorted(repr(k) for k in entry)[:8]) or "none"
        raise DataError(f"{path} has no {key!r} entry (its keys: {found}): not a CIFAR-100 python pickle; {redo}")


def read_split(path):
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"{path} is not a CIFAR-100 python pickle ({type(e).__name__}: {e}); "
                        "delete the folder and download it again") from None
    _check_keys(entry, path)
    try:
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"fine_labels"], dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} is not a CIFAR-100 python pickle ({type(e).__name__}: {e}); "
                        "delete the folder and download it again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: data has shape {data.shape} for {labels.shape[0]} labels, "
                        "expected N x 3072 with N labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: fine_labels outside 0..{NUM_CLASSES - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return TensorSplit(images, torch.from_numpy(labels))


def class_names(directory):
    """The 100 fine class names in label order from the archive's meta file; () where it is missing or unreadable
    (names are a convenience for reading predictions, not needed to train)."""
    try:
        with open(os.path.join(directory, "meta"), "rb") as f:
            names = pickle.load(f, encoding="bytes")[b"fine_label_names"]
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except Exception:
        return ()
    return names if len(names) == NUM_CLASSES else ()


@DATASET_REGISTRY.register("cifar100")
def load(cfg):
    root = cfg.DATASET.ROOT
    directory = os.path.join(root, FOLDER)
    paths = {s: os.path.join(directory, s) for s in ("train", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        if not cfg.DATASET.DOWNLOAD:
            raise DataError("CIFAR-100 not found and DATASET.DOWNLOAD is False; " + _how_to_get(directory))
        _download(root, directory)
        if not all(os.path.isfile(p) for p in paths.values()):
            raise DataError("the CIFAR-100 download did not contain train and test; " + _how_to_get(directory))
    return DatasetBundle(name="cifar100", num_classes=NUM_CLASSES, image_size=32, mean=MEAN, std=STD,
                         classes=class_names(directory), train=lambda: read_split(paths["train"]), test=lambda: read_split(paths["test"]),
                         sources=(paths["train"], paths["test"]))
