"""Stand-in datasets: random uint8 images of a real dataset's shape and class count, served under its name.

For machines without the dataset (timings do not depend on pixel values). The splits are generated once per
`SyntheticDataset` and shared by every run built from it (engine.build_run's `bundle`), so the variants of one
benchmark and the torchvision baseline (which gets them written as CIFAR-100 files) all train on the very same
images.
"""

import functools

import torch

from ..data.bundle import DatasetBundle, TensorSplit

# DATASET.TYPE -> (classes, image size, images in the real training split)
SHAPES = {"cifar100": (100, 32, 50000), "fashion_mnist": (10, 32, 60000), "tiny_imagenet": (200, 64, 100000),
          "imagenet": (1000, 224, 1281167)}
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def synthetic_split(n, num_classes, size, seed):
    """n random images (uint8, N x 3 x size x size) with round-robin labels, the same for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorSplit(images, torch.arange(n) % num_classes)


class SyntheticDataset:
    """A dataset loader (call it with a cfg for the DatasetBundle) serving synthetic splits under `dataset`'s name."""

    def __init__(self, dataset, num_train, num_test=64):
        self.name = dataset
        self.num_classes, self.image_size, _ = SHAPES[dataset]
        self.num_train, self.num_test = num_train, num_test

    @functools.cached_property
    def train_split(self):
        return synthetic_split(self.num_train, self.num_classes, self.image_size, seed=0)

    @functools.cached_property
    def test_split(self):
        return synthetic_split(self.num_test, self.num_classes, self.image_size, seed=1)

    def __call__(self, cfg):
        return DatasetBundle(name=self.name, num_classes=self.num_classes, image_size=self.image_size, mean=MEAN,
                             std=STD, train=lambda: self.train_split, test=lambda: self.test_split)
