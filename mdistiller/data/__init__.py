"""Datasets and loaders. Each dataset is one module that registers `load(cfg) -> DatasetBundle` under its
DATASET.TYPE name; importing this package imports them all, so adding a dataset is adding a file.

Loaders yield (images, labels, index) already on the device, with an order and augmentation that depend only on
(EXPERIMENT.SEED, epoch): see schedule.py and seeding.py.
"""

from ..utils.autoimport import import_submodules
from .build import build_dataloaders
from .bundle import DatasetBundle, DatasetMeta, FolderSplit, TensorSplit
from .registry import DATASET_REGISTRY

import_submodules(__name__, __path__)

__all__ = ["DATASET_REGISTRY", "DatasetBundle", "DatasetMeta", "FolderSplit", "TensorSplit", "build_dataloaders"]
