"""Detection batches for the loop: an endless, seeded stream of training images cut into "epochs" of a fixed
number of iterations (Detectron2 trains by iterations), and the test split sharded over the ranks.

The stream is Detectron2's TrainingSampler made resumable and independent of the process count: pass k over the
dataset is the permutation torch.randperm(N) under seed (SEED, k), global sample position p is pass p // N, entry
p % N, and each sample draws its augmentation (short side, flip) from its own generator seeded by (SEED, p). A
global batch is positions [it * B, (it + 1) * B); rank r of W takes the contiguous slice r * B / W ... of it. So
epoch e starts where e - 1 ended (a resumed run reads the very same images), and W processes of B / W images see
exactly the images and augmentations one process of B sees.
"""

import torch
from torch.utils.data import DataLoader, Dataset

from .data import collate

_MIX = 1_000_003  # keeps the per-pass and per-sample seeds apart


def _generator(*parts):
    seed = 0
    for part in parts:
        seed = (seed * _MIX + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class _Positions(Dataset):
    """Dataset items at global stream positions: (image, target, position)."""

    def __init__(self, dataset, seed, positions):
        self.dataset, self.seed, self.positions = dataset, seed, positions
        self._order = {}

    def __len__(self):
        return len(self.positions)

    def _index(self, position):
        n = len(self.dataset)
        epoch_of_data = position // n
        if epoch_of_data not in self._order:
            self._order = {epoch_of_data: torch.randperm(n, generator=_generator(self.seed, 1, epoch_of_data))}
        return int(self._order[epoch_of_data][position % n])

    def __getitem__(self, i):
        position = self.positions[i]
        image, target = self.dataset.load(self._index(position), generator=_generator(self.seed, 2, position))
        return image, target, position


def _collate_with_positions(batch):
    images, targets = collate([(image, target) for image, target, _ in batch])
    return images, targets, torch.tensor([p for _, _, p in batch], dtype=torch.int64)


class PeriodLoader:
    """`iters` batches per epoch of the stream above: (images, targets, positions) with this rank's
    `global_batch // world_size` images each. `set_epoch(e)` (0-based) selects the epoch, as a DistributedSampler's
    does."""

    def __init__(self, dataset, global_batch, iters, seed, rank=0, world_size=1, num_workers=0):
        if global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} must divide among {world_size} processes")
        self.dataset, self.global_batch, self.iters, self.seed = dataset, global_batch, iters, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.local_batch = global_batch // world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.iters

    def positions(self, epoch):
        """This rank's stream positions in `epoch`, batch after batch."""
        out = []
        for it in range(self.iters):
            start = (epoch * self.iters + it) * self.global_batch + self.rank * self.local_batch
            out.extend(range(start, start + self.local_batch))
        return out

    def __iter__(self):
        items = _Positions(self.dataset, self.seed, self.positions(self.epoch))
        return iter(DataLoader(items, batch_size=self.local_batch, shuffle=False, num_workers=self.num_workers,
                               collate_fn=_collate_with_positions, persistent_workers=False))


def test_loader(dataset, batch_size, rank=0, world_size=1, num_workers=0):
    """The test split, rank r taking images r, r + W, ...: every image evaluated once over all ranks."""
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
