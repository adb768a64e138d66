"""Seeds derived from (experiment seed, epoch, ...) by hashing, never from the global RNG.

Deriving every random stream from the run's seed and the epoch number is what lets a resumed run reproduce the
batches of an uninterrupted one: no RNG state has to be saved, and nothing that touches `torch`'s global
generator (model init, dropout, another library) can shift the data order. SplitMix64 is used because nearby
inputs (epoch 3 vs 4) must give unrelated seeds, which `seed + epoch` would not.
"""

import torch

_MASK = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*values):
    """A 63-bit seed (valid for `torch.Generator.manual_seed`) that depends on every value in order."""
    h = 0x6D64697374696C6C  # "mdistill": a fixed start so that mix_seed(0) is not 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h >> 1


# Stream tags, so the order of the training set and its augmentation never share random numbers by accident.
TRAIN_STREAM = 1
SUBSET_SEED = 20240607  # fixed: subsets must not depend on EXPERIMENT.SEED, so every run sees the same images


def epoch_seed(seed, epoch):
    return mix_seed(TRAIN_STREAM, seed, epoch)


def epoch_generator(seed, epoch):
    """A fresh CPU generator for one epoch's permutation and augmentation."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))
