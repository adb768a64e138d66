"""Deterministic, class-balanced subsets (DATASET.TRAIN_SUBSET / TEST_SUBSET).

Subsets make quick experiments and CPU smoke runs possible. They use a fixed internal seed rather than
EXPERIMENT.SEED so that every seed and every method is trained and scored on the same images; otherwise a
comparison between methods on a subset would also compare different data.
"""

import torch

from ..utils.errors import DataError
from .seeding import SUBSET_SEED


def quotas(k, num_classes):
    """Images per class: floor(k / C), plus one for the first k % C classes."""
    base, extra = divmod(k, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def balanced_subset(targets, k, num_classes, key, dataset):
    """Sorted indices of a class-balanced subset of size k of a split with labels `targets`.

    A class with fewer images than its quota gives all it has, and the shortfall goes one by one to the other
    classes (in class order) that still have images left, so the subset always has exactly k images."""
    n = int(targets.shape[0])
    if k > n:
        raise DataError(f"{key}={k} is larger than the {dataset} split it selects from ({n} images); "
                        f"use at most {n}, or 0 for all")
    targets = targets.to("cpu", torch.int64)
    g = torch.Generator().manual_seed(SUBSET_SEED)
    members = []  # per class: its indices in a fixed pseudo-random order
    for c in range(num_classes):
        idx = torch.nonzero(targets == c, as_tuple=True)[0]
        members.append(idx[torch.randperm(idx.numel(), generator=g)])
    want = quotas(k, num_classes)
    take = [min(w, m.numel()) for w, m in zip(want, members)]
    short = k - sum(take)
    while short > 0:  # terminates: k <= n guarantees enough spare images somewhere
        for c in range(num_classes):
            if short and take[c] < members[c].numel():
                take[c] += 1
                short -= 1
    chosen = torch.cat([m[:t] for m, t in zip(members, take)]) if num_classes else torch.empty(0, dtype=torch.int64)
    return torch.sort(chosen).values
