"""Passes over the training split for statistics (KD++'s teacher class means), not for training.

`unaugmented_train_loader`: the split as the model would see it at test time: same images (subset included), no
augmentation. `augmented_train_loader`: every image once through the training augmentation, from a fixed seed;
the KD++ authors computed their class means that way.

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
from .schedule import eval_slices
from .seeding import mix_seed

# The augmented statistics pass draws from this seed, never EXPERIMENT.SEED: KD++'s class means are a property of
# the teacher, shared (and cached) across the runs that use it.
AUGMENTED_PASS_SEED = mix_seed(0x6B647070)  # "kdpp"


def _with_eval_transform(train, test):
    """A view of the training FolderSplit that decodes with the test split's (deterministic) transform."""
    dataset = copy.copy(train.dataset)  # shallow: the file list is shared, only the transform changes
    for attr in ("transform", "transforms"):
        if hasattr(test.dataset, attr):
            setattr(dataset, attr, getattr(test.dataset, attr))
    return FolderSplit(dataset, train.targets, train.indices)


def _bundle(cfg, bundle):
    return bundle if bundle is not None else DATASET_REGISTRY.get(cfg.DATASET.TYPE, "DATASET.TYPE")(cfg)


def unaugmented_train_loader(cfg, device, batch_size=None, bundle=None):
    """Batches (images, labels, index) of the whole (subset) training split in index order, un-augmented.

    batch_size defaults to DATASET.TEST.BATCH_SIZE (a forward-only pass); `bundle`: in-memory data instead of
    DATASET.TYPE's (data/build.py)."""
    bundle = _bundle(cfg, bundle)
    name, c = bundle.name, bundle.num_classes
    train = _subset(bundle.train(), cfg.DATASET.TRAIN_SUBSET, c, "DATASET.TRAIN_SUBSET", f"{name} train")
    if isinstance(train, FolderSplit):
        train = _with_eval_transform(train, bundle.test())
    return _loader(train, bundle, torch.device(device), batch_size or cfg.DATASET.TEST.BATCH_SIZE, False, cfg,
                   0, 1)


def augmented_train_loader(cfg, device, batch_size=None, bundle=None):
    """Batches (images, labels, index) covering the whole (subset) training split once, each image through the
    training augmentation (crop/flip, or ImageNet's random-resized crop), drawn from AUGMENTED_PASS_SEED.

    It is the training loader of that seed's epoch 0 with one change: its batches cover every position of the
    permutation (training drops a final batch of one sample), so every image is seen exactly once."""
    bundle = _bundle(cfg, bundle)
    train = _subset(bundle.train(), cfg.DATASET.TRAIN_SUBSET, bundle.num_classes, "DATASET.TRAIN_SUBSET",
                    f"{bundle.name} train")
    fixed = cfg.clone()
    fixed.defrost()
    fixed.EXPERIMENT.SEED = AUGMENTED_PASS_SEED
    size = batch_size or cfg.DATASET.TEST.BATCH_SIZE
    loader = _loader(train, bundle, torch.device(device), size, True, fixed, 0, 1)
    slices = eval_slices(len(train), size)
    if hasattr(loader, "batches"):  # FolderLoader: its batch sampler holds the plan
        loader.batches.slices = slices
    else:
        loader.slices = slices
    loader.set_epoch(0)
    return loader
