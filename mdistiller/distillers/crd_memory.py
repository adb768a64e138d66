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

How the distinct negatives are drawn is the sampler's choice (CRD.SAMPLER), both giving a uniformly random
K-subset: "redraw" (the default) redraws collisions in rounds of data-dependent size, so the host waits for the
device several times a step; "keys" keeps the K largest of i.i.d. random keys over the training set, fixed shapes
and no host wait, for a step a CUDA graph can capture, at O(batch x num_train) memory; "auto" is "keys" while
`sync_free` is set (by prepare_capture, the hook an engine calls before it captures the step, or by
CRD.set_sync_free) and the keys fit, "redraw" otherwise. The two draw different negatives from the same RNG
state, so switching changes a run's numbers (not its distribution). The with-replacement draw has fixed shapes
whatever the sampler.

The banks are updated in place (their storage never moves, as a CUDA graph's replay needs); the loss's product
with a whole bank therefore multiplies a copy of it (row_scores), which autograd may keep for backward.

Under torch.distributed with world_size > 1 each rank draws its own negatives, but the memory update and the
Z estimate use the embeddings, indices and statistics of all ranks (all-gathered in rank order), so every
rank's banks and Z stay identical without broadcasting them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.distributed import all_gather_rows, world_size
from .crd_negatives import KEYS_MAX_ELEMENTS, iid_positions, sample_keys, sample_positions

MODES = ("exact", "relax")
SAMPLERS = ("redraw", "keys", "auto")


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
    whenever num_train <= (1 + K) * dim, i.e. for every CIFAR-sized set; the gather is kept for larger ones.
    When the anchor needs a gradient, the product multiplies a copy of the bank: autograd keeps its operand for
    backward, and ContrastMemory.update overwrites the bank in place before backward runs (the gathered rows
    are a copy already)."""
    n, dim = memory.shape
    if n <= idx.shape[1] * dim:
        if torch.is_grad_enabled() and anchor.requires_grad:
            memory = memory.clone()
        return (anchor @ memory.t()).gather(1, idx)
    return torch.bmm(memory[idx], anchor.unsqueeze(2)).squeeze(2)


def keys_fit(rows, num_train):
    """Whether the keys sampler's rows x num_train float64 keys stay within KEYS_MAX_ELEMENTS."""
    return rows * num_train <= KEYS_MAX_ELEMENTS


class ContrastMemory(nn.Module):
    def __init__(self, dim, train_targets, num_negatives, temperature, momentum, mode="exact", replace=False,
                 sampler="redraw", max_rows=None):
        """`sampler`: how distinct negatives are drawn (SAMPLERS, see the module docstring); `max_rows`: the
        largest batch (per process) the keys sampler must draw for, None if unknown (then not checked)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"CRD mode must be one of {MODES}, got {mode!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"CRD sampler must be one of {SAMPLERS}, got {sampler!r}")
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
        self.sampler = sampler
        self.keys_fit = max_rows is None or keys_fit(max_rows, self.num_train)
        if sampler == "keys" and not self.replace and not self.keys_fit:
            raise ValueError(f"the keys sampler needs {max_rows} x {self.num_train} keys, more than "
                             f"{KEYS_MAX_ELEMENTS}; use the redraw sampler or draw with replacement")
        # The switch for "auto": set (prepare_capture, CRD.set_sync_free) where the step must not wait on the
        # host, as before a CUDA-graph capture. Not saved: it describes how this process runs, not the model.
        self.sync_free = False
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

    @property
    def uses_keys(self):
        """Whether the distinct negatives come from the keys sampler ("keys", or "auto" under the hook)."""
        return self.sampler == "keys" or (self.sampler == "auto" and self.sync_free and self.keys_fit)

    @property
    def step_is_sync_free(self):
        """Whether drawing the negatives needs no host wait: with replacement, or with the keys sampler."""
        return self.replace or self.uses_keys

    def prepare_capture(self):
        """The engine's hook before it records the update as a CUDA graph (Distiller.prepare_capture asks every
        submodule): sets `sync_free`, so "auto" switches to the keys sampler; returns why the update still waits
        on the host, or None."""
        self.sync_free = True
        if world_size() > 1:
            return "under torch.distributed the memory update gathers the ranks' batch sizes to the host"
        if self.step_is_sync_free:
            return None
        if self.sampler == "redraw":
            return ("CRD.SAMPLER redraw draws negatives in rounds of data-dependent size; CRD.SAMPLER keys or auto "
                    "draws the same distribution without host waits")
        return (f"CRD.SAMPLER auto stays on redraw: the keys sampler's batch x {self.num_train} keys exceed "
                f"{KEYS_MAX_ELEMENTS}; CRD.NEG_REPLACE true draws without host waits (with replacement)")

    def sample(self, index):
        """(B, 1 + K) dataset indices per anchor: the positive, then K distinct samples of other classes (in no
        particular order; with replacement, K i.i.d. ones)."""
        labels = self.targets[index]
        start, count = self.class_start[labels], self.class_count[labels]
        if self.replace or not self.uses_keys:
            if self.replace:  # the draws sample_positions(..., replace=True) makes, without its checks' waits
                pos = iid_positions(self.num_train - count, self.num_negatives)
            else:
                pos = sample_positions(self.num_train - count, self.num_negatives)
            pos = pos + (pos >= start.unsqueeze(1)) * count.unsqueeze(1)  # skip the anchor's own class block
            negatives = self.order[pos]
        else:
            negatives = sample_keys(self.targets, labels, self.num_negatives)
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

        In place, so the buffers keep their storage (a CUDA graph replays fixed addresses); row_scores gives
        autograd a copy of the bank where it would otherwise keep the bank itself for backward."""
        v = all_gather_rows(torch.cat([v_s, v_t], 1).detach())
        index = all_gather_rows(index)
        dim = self.memory_s.shape[1]
        for name, new in (("memory_s", v[:, :dim]), ("memory_t", v[:, dim:])):
            bank = getattr(self, name)
            rows = bank.index_select(0, index) * self.momentum + new.to(bank.dtype) * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(self, v_s, v_t, index):
        """The contrastive loss of this batch; the banks are updated afterwards (they enter the loss as
        constants, as in CRD)."""
        loss = self.loss(v_s, v_t, self.sample(index))
        self.update(v_s, v_t, index)
        return loss
