"""From a config to (train loader, test loader, meta): the only entry point the engine uses."""

import torch

from ..utils.errors import ConfigError, DataError
from .bundle import DatasetMeta, TensorSplit
from .folder_loader import FolderLoader
from .memory_loader import InMemoryLoader
from .registry import DATASET_REGISTRY
from .subset import balanced_subset
from .views import view_recipe


def _subset(split, k, num_classes, key, what):
    if k and k > 0:
        return split.subset(balanced_subset(split.targets, int(k), num_classes, key, what))
    return split


def _loader(split, bundle, device, batch_size, train, cfg, rank, world_size, views=None):
    if isinstance(split, TensorSplit):
        return InMemoryLoader(split, bundle.mean, bundle.std, device, batch_size, train,
                              cfg.EXPERIMENT.SEED, rank, world_size, views)
    return FolderLoader(split, device, batch_size, train, cfg.DATASET.NUM_WORKERS, cfg.EXPERIMENT.SEED,
                        rank, world_size, views)


def build_dataloaders(cfg, device, rank=0, world_size=1, only_test=False, bundle=None, train_views=None):
    """Loaders for this rank and the dataset's meta; the batch contract is in schedule.py.

    only_test=True (evaluation tools) skips the training split: train loader None, num_train 0. `bundle`: a
    DatasetBundle to load instead of DATASET.TYPE's (in-memory data of benchmarks and tests). `train_views`: the
    method's `Distiller.train_views` (a views.py recipe name, passed by the engine; this layer does not import
    distillers): the training loader then yields B x V x C x H x W images."""
    views = view_recipe(train_views)
    device = torch.device(device)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if cfg.SOLVER.BATCH_SIZE <= 0 or cfg.SOLVER.BATCH_SIZE % world_size:
        raise ConfigError(f"SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE} must be a positive multiple of the "
                          f"number of processes ({world_size})")
    if bundle is None:
        bundle = DATASET_REGISTRY.get(cfg.DATASET.TYPE, "DATASET.TYPE")(cfg)
    name, c = bundle.name, bundle.num_classes

    test = _subset(bundle.test(), cfg.DATASET.TEST_SUBSET, c, "DATASET.TEST_SUBSET", f"{name} test")
    test_loader = _loader(test, bundle, device, cfg.DATASET.TEST.BATCH_SIZE, False, cfg, rank, world_size)
    train_loader, num_train, train_targets = None, 0, torch.empty(0, dtype=torch.int64)
    if not only_test:
        train = _subset(bundle.train(), cfg.DATASET.TRAIN_SUBSET, c, "DATASET.TRAIN_SUBSET", f"{name} train")
        train_loader = _loader(train, bundle, device, cfg.SOLVER.BATCH_SIZE, True, cfg, rank, world_size, views)
        if len(train_loader) == 0:
            raise DataError(f"{name}: {len(train)} training images make no batch of at least 2 per process "
                            f"(SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE}, {world_size} processes)")
        num_train, train_targets = len(train), train.targets.to("cpu", torch.int64).clone()
    meta = DatasetMeta(name=name, num_classes=c, image_size=bundle.image_size, num_train=num_train,
                       num_test=len(test), mean=tuple(bundle.mean), std=tuple(bundle.std),
                       train_targets=train_targets, sources=tuple(bundle.sources),
                       classes=tuple(bundle.classes))
    return train_loader, test_loader, meta
