"""Loader for datasets held entirely on the device (CIFAR-100, Fashion-MNIST).

The whole split is one uint8 tensor moved to the device once; a batch is an index gather plus a vectorised
crop/flip, so there are no worker processes and no host-to-device image copies during training.
"""

import torch

from .augment import Normalizer, crop_flip
from .schedule import eval_slices, train_slices
from .seeding import epoch_generator

PAD = 4  # CIFAR recipe: 32x32 crops of the image zero-padded by 4 pixels


class InMemoryLoader:
    """Yields (images float32 normalised, labels int64, index int64), all on `device`.

    train=True: the (seed, epoch) permutation, sharded per rank, with random crop (zero padding 4) + flip whose
    random numbers are drawn per position of the global permutation - so a sample's augmentation does not
    depend on the number of ranks. train=False: fixed order, this rank's shard, no augmentation. `views`: a
    views.ViewRecipe (training only): images come as B x V x C x H x W, view 0 the crop/flip above."""

    def __init__(self, split, mean, std, device, batch_size, train, seed=0, rank=0, world_size=1, views=None):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.targets = split.targets.to(self.device, torch.int64)
        self.normalize = Normalizer(mean, std, self.device)
        self.train = train
        self.views = views
        self.seed = seed
        self.epoch = 0
        n = len(split)
        if train:
            self.slices = train_slices(n, batch_size, rank, world_size)
        else:
            self.slices = eval_slices(n, batch_size, rank, world_size)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.slices)

    def __iter__(self):
        n = int(self.targets.shape[0])
        if not self.train:  # contiguous ranges: slices, not gathers
            for a, b in self.slices:
                index = torch.arange(a, b, device=self.device)
                yield self.normalize(self.images[a:b]), self.targets[a:b], index
            return
        g = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        extra = self.views.draw(n, g, PAD) if self.views else {}  # after the plain draws: view 0 is unchanged
        # one transfer per epoch, then slicing on the device
        perm, shifts, flips = (t.to(self.device) for t in (perm, shifts, flips))
        extra = {k: v.to(self.device) for k, v in extra.items()}
        for a, b in self.slices:
            index = perm[a:b]
            if self.views:
                part = {k: v[a:b] for k, v in extra.items()}
                images = self.views.tensor_views(self.images[index], shifts[a:b], flips[a:b], part, PAD)
            else:
                images = crop_flip(self.images[index], shifts[a:b], flips[a:b], pad=PAD)
            yield self.normalize(images), self.targets[index], index
