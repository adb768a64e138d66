"""The training split as the model would see it at test time: same images (subset included), no augmentation.

Statistics of the training set computed by a network (KD++'s teacher class means) should describe the images,
not one random crop of them. This yields the very split the training loader draws from - the same
DATASET.TRAIN_SUBSET selection, so sizes and indices agree with DatasetMeta - in fixed order through the test-time
pipeline: normalisation only for the in-memory datasets, the validation transform (e.g. resize + centre crop
on ImageNet) for folder datasets.
"""

import copy

import torch

from .build import _loader, _subset
from .bundle import FolderSplit
from .registry import DATASET_REGISTRY


def _with_eval_transform(train, test):
    """A view of the training FolderSplit that decodes with the test split's (deterministic) transform."""
    dataset = copy.copy(train.dataset)  # shallow: the file list is shared, only the transform changes
    for attr in ("transform", "transforms"):
        if hasattr(test.dataset, attr):
            setattr(dataset, attr, getattr(test.dataset, attr))
    return FolderSplit(dataset, train.targets, train.indices)


def unaugmented_train_loader(cfg, device, batch_size=None):
    """Batches (images, labels, index) of the whole (subset) training split in index order, un-augmented.

    batch_size defaults to DATASET.TEST.BATCH_SIZE (a forward-only pass)."""
    bundle = DATASET_REGISTRY.get(cfg.DATASET.TYPE, "DATASET.TYPE")(cfg)
    name, c = bundle.name, bundle.num_classes
    train = _subset(bundle.train(), cfg.DATASET.TRAIN_SUBSET, c, "DATASET.TRAIN_SUBSET", f"{name} train")
    if isinstance(train, FolderSplit):
        train = _with_eval_transform(train, bundle.test())
    return _loader(train, bundle, torch.device(device), batch_size or cfg.DATASET.TEST.BATCH_SIZE, False, cfg,
                   0, 1)
