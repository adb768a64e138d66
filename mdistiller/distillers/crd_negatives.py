"""Per-row sampling of K distinct positions for CRD's negatives, batched over rows (no loop over rows or pool).

CRD (RepDistiller's CIFAR100InstanceSample) draws a row's K negatives from the samples of the other classes
*without* replacement, and with replacement only when K exceeds that pool. Here row b's pool is the positions
0 .. pool[b] - 1 (crd_memory.py maps them to dataset indices).

Without replacement, a uniform K-subset is drawn by redrawing collisions: draw K positions i.i.d. (generated in
ascending order, so repeats are neighbours), keep the distinct ones, draw as many new positions as are missing,
keep those not seen yet, and so on. Each round treats
every position alike, so the distribution of the final set is invariant under any permutation of the pool, and
the only such distribution over K-subsets is the uniform one. Rounds shrink the missing count by a factor of
about K / pool, so when K > pool / 2 the pool - K positions to *leave out* are drawn that way instead. Memory
stays O(rows x K) (O(rows x pool) only in that complement case, where pool < 2K); no row permutes its pool.

A row's positions come back in no particular order (mostly ascending: the first draw is sorted, redrawn slots
are not); the NCE loss sums over negatives, so order does not matter. Randomness comes from the global torch RNG
of pool's device, so a given RNG state always gives the same positions.

The redraw rounds have data-dependent sizes, so on a GPU the host waits for the device several times per draw
(value reads, nonzero, boolean indexing): no CUDA graph can capture them. `sample_keys` draws the same
distribution with fixed shapes only: i.i.d. float64 keys over the whole training set per row, the row's own
class masked out, the K largest kept. It costs O(rows x num_train) memory (KEYS_MAX_ELEMENTS bounds it) and
consumes the RNG differently, so a run with it draws other negatives than a run with the redraw sampler.
`iid_positions` (with replacement) has fixed shapes too.
"""

import torch

# Largest rows x num_train the keys sampler may allocate: 2^28 float64 keys are 2 GiB (plus a boolean mask).
KEYS_MAX_ELEMENTS = 2 ** 28


def _uniform_below(high):
    """One uniform integer in [0, high[i]) per entry of high (int64 tensor), from float64 uniforms."""
    u = torch.rand(high.shape, device=high.device, dtype=torch.float64)
    return torch.minimum((u * high).long(), high - 1)


def iid_positions(pool, k):
    """(B, k) i.i.d. uniform positions in [0, pool[b]): no validation and no data-dependent shape, so no host
    wait (the with-replacement draw of CRD.NEG_REPLACE; pool must be >= 1, which ContrastMemory guarantees)."""
    return _uniform_below(pool.unsqueeze(1).expand(-1, k))


def sample_keys(targets, labels, k):
    """(B, k) dataset indices: for each labels[b], k distinct samples whose target differs, a uniformly random
    k-subset of them, without any host wait (fixed shapes throughout, so a CUDA graph can capture it).

    Every sample gets an i.i.d. U(0, 1) float64 key per row, the row's own class gets -1, and topk keeps the k
    largest: with i.i.d. continuous keys every ordering of the candidates is equally likely, hence so is every
    k-subset of the top. Needs k <= the smallest other-class pool (ContrastMemory caps K so), else own-class
    samples would fill the rest. Memory: rows x num_train keys (see KEYS_MAX_ELEMENTS)."""
    keys = torch.rand(labels.numel(), targets.numel(), device=targets.device, dtype=torch.float64)
    keys.masked_fill_(targets.unsqueeze(0) == labels.unsqueeze(1), -1.0)
    return keys.topk(k, dim=1, sorted=False).indices


def _sorted_uniform_below(high, counts):
    """counts[r] i.i.d. uniform integers in [0, high[r]) for each row r, ascending within a row, flat in row
    order, without a sort: with E_1 .. E_{n+1} i.i.d. Exp(1) and S_i their partial sums, S_1 / S_{n+1} <= ..
    <= S_n / S_{n+1} are distributed as n sorted i.i.d. U(0, 1). The sums are taken in fixed point (int64, in
    units of 2^-32), because integer sums do not depend on the order a GPU adds them in, float sums do."""
    width = int(counts.max()) if counts.numel() else 0
    spacings = torch.empty(counts.numel(), width + 1, device=high.device, dtype=torch.float64).exponential_()
    sums = (spacings * 2.0 ** 32).long().cumsum_(1).double()  # exact in float64 while below 2^53
    u = sums[:, :width] / sums.gather(1, counts.unsqueeze(1))
    values = torch.minimum((u * high.unsqueeze(1)).long(), (high - 1).unsqueeze(1))
    if bool((counts == width).all()):
        return values.view(-1)
    return values[torch.arange(width, device=high.device) < counts.unsqueeze(1)]


def _distinct_keys(pool, counts, stride):
    """Keys row * stride + position, rows in order: counts[r] distinct positions in [0, pool[r]) for row r.

    Meant for counts <= pool / 2, where each redraw round leaves at most about half the missing ones missing.
    The first draw comes sorted; a slot holding a repeat of its left neighbour gets a fresh candidate, which
    is kept if it is neither in that draw, nor among the candidates kept in earlier rounds, nor a repeat of
    another candidate of this round, and is redrawn otherwise."""
    rows = torch.repeat_interleave(torch.arange(pool.numel(), device=pool.device), counts)
    keys = rows * stride + _sorted_uniform_below(pool, counts)
    slots = (keys[1:] == keys[:-1]).nonzero().squeeze(1) + 1
    known = [keys]  # sorted chunks: the first draw, then each later round's accepted candidates
    keys = keys.clone()  # the result: the first draw with its repeats replaced
    while slots.numel():
        cand, order = torch.sort(rows[slots] * stride + _uniform_below(pool[rows[slots]]), stable=True)
        slots = slots[order]
        fresh = torch.ones_like(cand, dtype=torch.bool)
        fresh[1:] = cand[1:] != cand[:-1]
        for seen in known:
            at = torch.searchsorted(seen, cand).clamp_(max=seen.numel() - 1)
            fresh &= seen[at] != cand
        keys[slots[fresh]] = cand[fresh]
        if fresh.any():
            known.append(cand[fresh])  # still sorted
        slots = slots[~fresh]
    return keys


def sample_positions(pool, k, replace=False):
    """(B, k) int64: row b holds k positions in [0, pool[b]), distinct when k <= pool[b], else i.i.d. uniform
    (with replacement, as CRD does when K exceeds the pool). pool: (B,) int64 tensor of pool sizes >= 1.
    replace=True: i.i.d. uniform in every row (the published ImageNet and Tiny-ImageNet samplers)."""
    pool = torch.as_tensor(pool, dtype=torch.int64)
    if k < 0 or (pool.numel() and int(pool.min()) < 1):
        raise ValueError(f"sample_positions needs k >= 0 and pools of at least one position, got k={k}, "
                         f"smallest pool {int(pool.min()) if pool.numel() else None}")
    out = torch.empty(pool.numel(), k, dtype=torch.int64, device=pool.device)
    if pool.numel() == 0 or k == 0:
        return out
    if replace:  # the same draws as the masked path below took for an all-True mask, without its host waits
        return iid_positions(pool, k)
    short = pool < k  # K exceeds the pool: i.i.d., as CRD falls back to
    complement = ~short & (2 * k > pool)
    sparse = ~short & ~complement
    if short.any():
        p = pool[short].unsqueeze(1).expand(-1, k)
        out[short] = _uniform_below(p)
    if sparse.any():
        p = pool[sparse]
        stride = int(p.max())
        keys = _distinct_keys(p, torch.full_like(p, k), stride)
        out[sparse] = (keys % stride).view(-1, k)
    if complement.any():
        p = pool[complement]
        stride = int(p.max())
        keys = _distinct_keys(p, p - k, stride)  # the positions to leave out
        keep = torch.arange(stride, device=pool.device) < p.unsqueeze(1)
        keep.view(-1)[keys] = False
        out[complement] = keep.nonzero()[:, 1].view(-1, k)
    return out
