"""CRD's memory bank and NCE objective (Tian et al., ICLR 2020), kept apart from the distiller so each piece
can be tested against hand computations.

Two banks of num_train x dim rows hold a running (momentum) average of every training sample's student and
teacher embedding. A student embedding is contrasted against the teacher bank and vice versa: its positive is
a row of its own sample ("exact") or of a random same-class sample ("relax"), its K negatives rows of K distinct
samples of other classes. The banks, and the NCE normalisation constant Z, are buffers, so a checkpoint holds
them and a resumed run continues with exactly the same state.

A row's K negatives are K distinct samples of the other classes, a uniformly random K-subset of that pool, as
CRD draws them (np.random.choice without replacement; crd_negatives.py does it batched). CRD falls back to
drawing with replacement when K exceeds the pool; here that cannot happen, because K is capped at the size of
the smallest pool, num_train - (largest class count): on a small training subset every anchor then still has
K distinct candidates, and the noise term K * Pn = K / num_train stays below 1. The draw uses the global torch
RNG of the bank's device (which the trainer seeds and checkpoints, so a resumed run draws the same ones).
CRD.NEG_REPLACE draws them i.i.d. instead, with replacement, as the published ImageNet and Tiny-ImageNet samplers
do (mdistiller's and RepDistiller's `np.random.choice(..., replace=True)` there); the configs for those datasets
set it.

Under torch.distributed with world_size > 1 each rank draws its own negatives, but the memory update and the
Z estimate use the embeddings, indices and statistics of all ranks (all-gathered in rank order), so every
rank's banks and Z stay identical without broadcasting them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.distributed import all_gather_rows
from .crd_negatives import sample_positions

MODES = ("exact", "relax")


def nce_loss(logits, log_z, num_train):
    """CRD's NCE loss, mean over anchors, for logits = <anchor, row> / T of shape (B, 1 + K), positive first.

    With P = exp(logits) / Z and noise mass c = K * Pn = K / num_train:
        loss = -log(P_pos / (P_pos + c)) - sum_k log(c / (P_k + c)),
    written with softplus in log space (no overflow of exp(1 / T), no log(0)); CRD's eps of 1e-7 inside the
    logarithms is not needed then."""
    log_p = logits - log_z
    log_c = math.log((logits.shape[1] - 1) / num_train)
    positive = F.softplus(log_c - log_p[:, 0])
    negatives = F.softplus(log_p[:, 1:] - log_c).sum(1)
    return (positive + negatives).mean()


def row_scores(memory, anchor, idx):
    """<memory[idx[b, j]], anchor[b]> for all b, j, shape of idx.

    One product with the whole bank (B x num_train) is much smaller than the (B, 1 + K, dim) rows CRD gathers
    whenever num_train <= (1 + K) * dim, i.e. for every CIFAR-sized set; the gather is kept for larger ones."""
    n, dim = memory.shape
    if n <= idx.shape[1] * dim:
        return (anchor @ memory.t()).gather(1, idx)
    return torch.bmm(memory[idx], anchor.unsqueeze(2)).squeeze(2)


class ContrastMemory(nn.Module):
    def __init__(self, dim, train_targets, num_negatives, temperature, momentum, mode="exact", replace=False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"CRD mode must be one of {MODES}, got {mode!r}")
        targets = torch.as_tensor(train_targets, dtype=torch.int64).cpu()
        counts = torch.bincount(targets)
        pool = targets.numel() - int(counts.max()) if targets.numel() else 0
        if pool <= 0:
            raise ValueError("CRD needs training samples of at least two classes to draw negatives from")
        self.num_train = targets.numel()
        self.replace = bool(replace)
        # with replacement (the published ImageNet sampler) any K is drawable, so K is not capped there
        self.num_negatives = int(num_negatives) if self.replace else min(int(num_negatives), pool)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.mode = mode
        # CRD's initialisation: uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3), so each entry has
        # variance 1 / dim and a row's expected squared norm is 1, like the normalised rows that replace it.
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(self.num_train, dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(self.num_train, dim) * (2 * stdv) - stdv)
        # Z for (student anchor vs teacher bank, teacher anchor vs student bank); 0 = not estimated yet.
        self.register_buffer("z", torch.zeros(2))
        self._z_ready = False
        # Class-sorted sample order: class c's samples are order[start[c] : start[c] + count[c]], so sampling
        # "any other class" is sampling a position in order[] that skips that block. Derived from the
        # targets, hence not saved.
        self.register_buffer("targets", targets, persistent=False)
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_ready = False  # re-read from the loaded buffer on the next step

    def sample(self, index):
        """(B, 1 + K) dataset indices per anchor: the positive, then K distinct samples of other classes (in no
        particular order)."""
        labels = self.targets[index]
        start, count = self.class_start[labels], self.class_count[labels]
        pos = sample_positions(self.num_train - count, self.num_negatives, self.replace)
        pos = pos + (pos >= start.unsqueeze(1)) * count.unsqueeze(1)  # skip the anchor's own class block
        negatives = self.order[pos]
        if self.mode == "exact":
            positive = index
        else:
            u = torch.rand(index.shape[0], device=index.device, dtype=torch.float64)
            positive = self.order[start + torch.minimum((u * count).long(), count - 1)]
        return torch.cat([positive.unsqueeze(1), negatives], 1)

    @torch.no_grad()
    def _estimate_z(self, logits_s, logits_t):
        """Z = mean(exp(logits)) * num_train over the first batch of all ranks, as CRD estimates it once."""
        stats = torch.stack([logits_s.double().exp().sum(), logits_t.double().exp().sum(),
                             torch.tensor(float(logits_s.numel()), dtype=torch.float64, device=logits_s.device)])
        total = all_gather_rows(stats.unsqueeze(0)).sum(0)
        self.z.copy_(total[:2] / total[2] * self.num_train)

    def loss(self, v_s, v_t, idx):
        """Sum of both directions' NCE losses for anchors v_s, v_t (L2-normalised) against rows idx."""
        logits_s = row_scores(self.memory_t, v_s, idx) / self.temperature
        logits_t = row_scores(self.memory_s, v_t, idx) / self.temperature
        if not self._z_ready:
            if not bool((self.z > 0).all()):
                self._estimate_z(logits_s, logits_t)
            self._z_ready = True
        log_z = self.z.log()
        return nce_loss(logits_s, log_z[0], self.num_train) + nce_loss(logits_t, log_z[1], self.num_train)

    @torch.no_grad()
    def update(self, v_s, v_t, index):
        """Rows `index` <- normalize(m * row + (1 - m) * embedding), with every rank's batch.

        Out of place: the loss's graph may hold the bank itself (row_scores' product), which an in-place
        write would invalidate before backward."""
        v = all_gather_rows(torch.cat([v_s, v_t], 1).detach())
        index = all_gather_rows(index)
        dim = self.memory_s.shape[1]
        for name, new in (("memory_s", v[:, :dim]), ("memory_t", v[:, dim:])):
            bank = getattr(self, name)
            rows = bank.index_select(0, index) * self.momentum + new.to(bank.dtype) * (1 - self.momentum)
            setattr(self, name, bank.index_copy(0, index, F.normalize(rows, dim=1)))

    def forward(self, v_s, v_t, index):
        """The contrastive loss of this batch; the banks are updated afterwards (they enter the loss as
        constants, as in CRD)."""
        loss = self.loss(v_s, v_t, self.sample(index))
        self.update(v_s, v_t, index)
        return loss
