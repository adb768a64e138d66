"""Fashion-MNIST, the dataset that exists offline (Debian package `dataset-fashion-mnist`).

Images are zero-padded from 28x28 to 32x32 and repeated to 3 channels so that every CIFAR model runs unchanged;
it stands in for CIFAR-100 in smoke tests and CPU-only experiments.
"""

import os

import torch
import torch.nn.functional as F

from ..utils.errors import DataError
from .bundle import DatasetBundle, TensorSplit
from .idx_format import read_idx
from .registry import DATASET_REGISTRY

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# over the padded training set (padding lowers the mean of the 28x28 images, 0.2860, by 784/1024)
MEAN = (0.2190, 0.2190, 0.2190)
STD = (0.3318, 0.3318, 0.3318)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(directory, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _locate(directory):
    """{split: (images path, labels path)} if all four files are in `directory`, else None."""
    found = {split: (_find(directory, img), _find(directory, lab)) for split, (img, lab) in FILES.items()}
    return found if all(p for pair in found.values() for p in pair) else None


def _download(root):
    import torchvision

    try:
        for train in (True, False):
            torchvision.datasets.FashionMNIST(root, train=train, download=True)
    except Exception as e:  # network errors come in many types; the message is what matters
        return f"{type(e).__name__}: {e}"
    return None


def find_files(cfg):
    """Debian's directory first, then torchvision's layout under DATASET.ROOT, then a download if allowed."""
    raw = os.path.join(cfg.DATASET.ROOT, "FashionMNIST", "raw")
    looked = [DEBIAN_FASHION_MNIST_DIR, raw]
    for directory in looked:
        found = _locate(directory)
        if found:
            return found
    why = "DATASET.DOWNLOAD is False"
    if cfg.DATASET.DOWNLOAD:
        why = _download(cfg.DATASET.ROOT)
        found = _locate(raw)
        if found:
            return found
        why = f"download failed ({why})" if why else "download did not produce the files"
    raise DataError(f"Fashion-MNIST not found in {' or '.join(looked)} and {why}; fix: "
                    f"`apt-get install dataset-fashion-mnist`, or put train-images-idx3-ubyte.gz, "
                    f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in {raw}")


def read_split(images_path, labels_path):
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1).to(torch.int64)
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{images_path} ({tuple(images.shape)}) and {labels_path} ({labels.shape[0]} labels) "
                        "do not form a Fashion-MNIST split of 28x28 images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{labels_path} has labels outside 0..{len(CLASSES) - 1}")
    padded = F.pad(images, (2, 2, 2, 2))[:, None]  # N x 1 x 32 x 32
    return TensorSplit(padded.expand(-1, 3, -1, -1), labels)  # 3 channels as a view: no extra memory


@DATASET_REGISTRY.register("fashion_mnist")
def load(cfg):
    files = find_files(cfg)
    return DatasetBundle(name="fashion_mnist", num_classes=len(CLASSES), image_size=32, mean=MEAN, std=STD,
                         classes=CLASSES, train=lambda: read_split(*files["train"]), test=lambda: read_split(*files["test"]),
                         sources=(*files["train"], *files["test"]))
