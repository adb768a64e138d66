"""Datasets and loaders. Each dataset is one module that registers `load(cfg) -> DatasetBundle` under its
DATASET.TYPE name; the list below imports them all, so adding a dataset is a file and its line there.

Loaders yield (images, labels, index) already on the device, with an order and augmentation that depend only on
(EXPERIMENT.SEED, epoch): see schedule.py and seeding.py.
"""

from .build import build_dataloaders
from .bundle import DatasetBundle, DatasetMeta, FolderSplit, TensorSplit
from .registry import DATASET_REGISTRY

# The datasets (DATASET.TYPE), each registering itself.
from . import cifar100, fashion_mnist, image_folder_dataset, imagenet, tiny_imagenet  # noqa: E402,F401

__all__ = ["DATASET_REGISTRY", "DatasetBundle", "DatasetMeta", "FolderSplit", "TensorSplit", "build_dataloaders"]
