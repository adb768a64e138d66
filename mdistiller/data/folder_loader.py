"""Loader for datasets decoded from image files (Tiny-ImageNet, ImageNet): DataLoader workers, PIL transforms.

Determinism across resume comes from seeding each sample's random transform from (seed, epoch, index) right
before it is applied. Seeding workers alone would not suffice: with persistent workers a worker's RNG carries
over from epoch to epoch, so epoch 5 of a resumed run would see different crops than epoch 5 of a run started at
epoch 0. Per-sample seeds also make augmentation independent of NUM_WORKERS and of the number of ranks.
"""

import copy

import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.errors import DataError
from .schedule import eval_slices, train_slices
from .seeding import epoch_generator, epoch_seed, mix_seed
from .views import ViewTransform


class IndexedDataset(Dataset):
    """(image, label, index) where index is the position in the (subset) split, 0..len-1.

    A key may be `(index, epoch_seed)`: the transform then draws its random numbers from a seed derived from
    both, inside `fork_rng` so that the global RNG of the process is left as it was (matters with 0 workers,
    where this runs in the training process). `views`: a views.ViewRecipe: the image is its V x C x H x W views,
    made from the dataset's own training transform."""

    def __init__(self, split, views=None):
        self.dataset = split.dataset
        self.indices = split.indices
        if views is not None:
            if not hasattr(self.dataset, "transform"):
                raise DataError(f"train views '{views.name}' need a dataset with a `transform` attribute (an "
                                f"ImageFolder); got {type(self.dataset).__name__}")
            self.dataset = copy.copy(self.dataset)  # shallow: the file list is shared, only the transform changes
            self.dataset.transform = ViewTransform(views, split.dataset.transform)

    def __len__(self):
        return len(self.dataset) if self.indices is None else int(self.indices.numel())

    def _get(self, i):
        base = i if self.indices is None else int(self.indices[i])
        image, label = self.dataset[base]
        return image, label, i

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed(seed, i))  # CPU only: leave CUDA RNGs alone
                return self._get(i)
        return self._get(key)


class PlannedBatches:
    """Batch sampler for the DataLoader: this rank's batches from `schedule.py`, re-permuted by set_epoch."""

    def __init__(self, num, batch_size, train, seed=0, rank=0, world_size=1):
        self.num = num
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.slices = (train_slices if train else eval_slices)(num, batch_size, rank, world_size)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.slices)

    def __iter__(self):
        if not self.train:
            for a, b in self.slices:
                yield list(range(a, b))
            return
        perm = torch.randperm(self.num, generator=epoch_generator(self.seed, self.epoch)).tolist()
        s = epoch_seed(self.seed, self.epoch)
        for a, b in self.slices:
            yield [(i, s) for i in perm[a:b]]


class FolderLoader:
    """Yields (images, labels, index) on `device`, like `InMemoryLoader`, from a torch DataLoader."""

    def __init__(self, split, device, batch_size, train, num_workers, seed=0, rank=0, world_size=1, views=None):
        self.device = torch.device(device)
        self.seed = seed
        self.batches = PlannedBatches(len(split), batch_size, train, seed, rank, world_size)
        cuda = self.device.type == "cuda"
        self.loader = DataLoader(
            IndexedDataset(split, views), batch_sampler=self.batches, num_workers=num_workers, pin_memory=cuda,
            persistent_workers=num_workers > 0, generator=epoch_generator(seed, 0))
        self.non_blocking = cuda

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)
        # also fixes the worker seeds DataLoader derives (for anything not seeded per sample)
        self.loader.generator = epoch_generator(self.seed, epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for images, labels, index in self.loader:
            yield (images.to(self.device, non_blocking=self.non_blocking),
                   labels.to(self.device, non_blocking=self.non_blocking),
                   index.to(self.device, non_blocking=self.non_blocking))
