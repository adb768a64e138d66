"""Which samples each rank sees in each step; shared by the in-memory and the folder loaders.

Training: one permutation per (seed, epoch) over the whole dataset, cut into global batches of SOLVER.BATCH_SIZE;
every rank takes its contiguous share of each global batch. Because the permutation is the same on all ranks
and independent of the world size, N processes see exactly the batches one process would see, which keeps
multi-GPU runs comparable with single-GPU ones. The last, partial global batch is kept unless a rank's share of
it would be a single sample (or none), on which BatchNorm cannot train - then it is dropped on all ranks alike.

Test: contiguous shards, each sample once across ranks, no padding, so distributed accuracy counts are exact.
"""


def _share(start, size, rank, world_size):
    """Positions [a, b) of rank's part of the block [start, start+size); parts differ in size by at most one."""
    return start + rank * size // world_size, start + (rank + 1) * size // world_size


def train_slices(num, global_batch, rank=0, world_size=1):
    """Position ranges (into the epoch's permutation) of the batches `rank` trains on, in step order."""
    if global_batch <= 0 or global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not a positive multiple of world size {world_size}")
    slices = []
    for start in range(0, num, global_batch):
        size = min(global_batch, num - start)
        if size < global_batch and size // world_size < 2:
            break  # a final batch where some rank would get < 2 samples
        slices.append(_share(start, size, rank, world_size))
    return slices


def eval_slices(num, batch_size, rank=0, world_size=1):
    """Position ranges of `rank`'s test batches: its contiguous shard, cut into batches of `batch_size`."""
    lo, hi = _share(0, num, rank, world_size)
    return [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
