"""The hand-off between a dataset module and the loaders: what a dataset is, independent of how it is batched.

A dataset module only knows how to find and decode its files; `build.py` turns the `DatasetBundle` it returns
into loaders. Splits are loaded lazily (zero-argument callables) so that evaluation-only tools never pay for
reading or scanning a training split they do not use.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch


@dataclass
class DatasetMeta:
    """What models, distillers and logs need to know about the data; sizes are after subsetting."""

    name: str
    num_classes: int
    image_size: int
    num_train: int
    num_test: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    # labels of the (subset) training set in index order, int64 on CPU: CRD samples negatives by class
    train_targets: torch.Tensor = field(repr=False)
    # the files (or folders) the data was read from: what the run's dataset fingerprint is computed over
    sources: Tuple[str, ...] = ()
    # class names in label order (folder datasets: the class folders), so predictions map back to names; () = unnamed
    classes: Tuple[str, ...] = ()


@dataclass
class TensorSplit:
    """A split small enough to live on the device: uint8 N x 3 x H x W images and int64 labels."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self):
        return int(self.targets.shape[0])

    def subset(self, indices):
        return TensorSplit(self.images[indices], self.targets[indices])


@dataclass
class FolderSplit:
    """A split decoded per sample from files; `dataset[i]` returns (image tensor, label).

    `indices` (None = all) selects a subset without touching the underlying dataset, which may be large."""

    dataset: object
    targets: torch.Tensor
    indices: Optional[torch.Tensor] = None

    def __len__(self):
        return int(self.targets.shape[0])

    def subset(self, indices):
        base = indices if self.indices is None else self.indices[indices]
        return FolderSplit(self.dataset, self.targets[indices], base)


@dataclass
class DatasetBundle:
    """What `load(cfg)` of a registered dataset returns. `train` / `test` build their split when called."""

    name: str
    num_classes: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train: Callable[[], object]
    test: Callable[[], object]
    sources: Tuple[str, ...] = ()  # files (in-memory datasets) or split folders (folder datasets) read
    classes: Tuple[str, ...] = ()  # class names in label order, where the dataset names them
