"""WKD-L's CKA ground cost: 1 - linear CKA between the classes of the teacher's logits over the training set.

The authors compute it offline, once per teacher, and load it from WKD.COST_MATRIX_PATH: every training image
through the teacher with the test-time transform, each class's logits X_i (n x C) kept for its first n images, n
the smallest class's count, centred over the images, and
    CKA(X_i, X_j) = ||X_j^T X_i||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F),   M_ij = 1 - CKA(X_i, X_j).
Here it is the builder's teacher pass (as KD++'s class means, class_means.py): rank 0 computes it or reads it from a
cache next to the teacher checkpoint, keyed by the checkpoint's content hash and the data, and every rank receives it:

    <checkpoint>.wkd_cka.<dataset>-n<num images>.<sha256 of the checkpoint, 16 hex>.pt

holding {"format", "cost" (C, C) float32 (unsharpened), "per_class", "num_classes", "num_train", "checkpoint_sha256"}.
A teacher held in memory (no checkpoint file) is computed, never cached.
"""

import os
import time

import torch
import torch.nn.functional as F

from ..data.fingerprint import file_sha256
from ..data.unaugmented import unaugmented_train_loader
from ..models.teacher_ckpt import teacher_ckpt_path
from ..utils import distributed
from ..utils.checkpoint import atomic_save, load_file, remove_stale_caches
from ..utils.errors import ConfigError
from ..utils.logger import info
from ..utils.progress import bar

CACHE_FORMAT = "mdistiller-wkd-cka-v1"


def smallest_class_count(train_targets, num_classes):
    """n: every class's logits are truncated to the smallest class's count, which CKA needs to be >= 2."""
    counts = torch.bincount(train_targets.long(), minlength=num_classes)
    n, k = int(counts.min()), int(counts.argmin())
    if n < 2:
        raise ConfigError(f"config key WKDL.COST_MATRIX: cka needs 2 training images of every class, class {k} has "
                          f"{n} in this training set; use a larger DATASET.TRAIN_SUBSET or WKDL.COST_MATRIX fc")
    return n


@torch.no_grad()
def collect_class_logits(teacher, batches, num_classes, per_class):
    """(C, per_class, C) float32: the teacher's (eval-mode) logits of each class's first `per_class` images in the
    batches' order."""
    was_training = teacher.training
    teacher.eval()
    kept, filled = None, None
    for batch in bar(batches, desc="WKD cost: teacher logits", unit="batch"):
        images, labels = batch[0], batch[1]
        logits = teacher(images)[0].float()
        if kept is None:
            kept = logits.new_zeros(num_classes, per_class, logits.shape[1])
            filled = torch.zeros(num_classes, dtype=torch.int64, device=logits.device)
        labels = labels.to(logits.device)
        onehot = F.one_hot(labels, num_classes)
        rank = (onehot.cumsum(0) - 1).gather(1, labels[:, None]).squeeze(1) + filled[labels]  # place in its class
        keep = rank < per_class
        kept[labels[keep], rank[keep]] = logits[keep]
        filled += onehot.sum(0)
    teacher.train(was_training)
    if kept is None or int(filled.min()) < per_class:
        raise RuntimeError(f"the WKD cost pass saw fewer than {per_class} images of some class")
    return kept


def cka_cost(class_logits):
    """1 - linear CKA (C, C) float32 between the classes of `class_logits` (C, n, D), in float64: with the centred
    Gram matrices K_i = X_i X_i^T, ||X_j^T X_i||_F^2 = <K_i, K_j>_F and ||X_i^T X_i||_F = ||K_i||_F."""
    x = class_logits.double()
    x = x - x.mean(dim=1, keepdim=True)
    grams = (x @ x.transpose(1, 2)).flatten(1)
    inner = grams @ grams.t()
    norms = inner.diagonal().sqrt()
    return (1 - inner / (norms[:, None] * norms[None, :]).clamp_min(1e-300)).float()


def load_or_compute_cost(ckpt_path, teacher, num_classes, per_class, batches_fn, tag, num_train):
    """(cost (C, C), cache path or None): from the cache when it matches, else computed from `batches_fn()` and
    cached; `ckpt_path` None: computed, not cached."""
    def compute():
        start = time.perf_counter()
        cost = cka_cost(collect_class_logits(teacher, batches_fn(), num_classes, per_class)).cpu()
        info(f"WKD cost matrix: 1 - CKA of the teacher's logits, {num_classes} classes x {per_class} images, "
             f"{time.perf_counter() - start:.1f} s")
        return cost

    if ckpt_path is None:
        return compute(), None
    sha = file_sha256(ckpt_path)
    path = f"{ckpt_path}.wkd_cka.{tag}.{sha[:16]}.pt"
    want = {"format": CACHE_FORMAT, "num_classes": num_classes, "per_class": per_class, "num_train": num_train,
            "checkpoint_sha256": sha}
    if os.path.isfile(path):
        try:
            cache = load_file(path, "WKD cost cache")
            usable = (all(cache.get(k) == v for k, v in want.items())
                      and tuple(cache["cost"].shape) == (num_classes, num_classes))
        except Exception:  # unreadable or truncated: recompute rather than stop the run
            usable = False
        if usable:
            info(f"WKD cost matrix: loaded from {path}")
            return cache["cost"].float(), path
        info(f"WKD cost matrix: cache {path} does not match this teacher and data; recomputing")
    cost = compute()
    try:
        atomic_save({**want, "cost": cost, "dataset": tag}, path)
        remove_stale_caches(path, ckpt_path, "wkd_cka", tag)
    except OSError as e:  # a read-only checkpoint folder costs a recomputation next time, not the run
        info(f"WKD cost matrix: not cached ({path}: {e})")
    return cost, path


def cost_for_run(cfg, teacher, meta, device, bundle=None, cache=True):
    """The CKA cost of this run's teacher over this run's (subset) training set, un-augmented, cached by checkpoint
    hash; `bundle`, `cache`: as class_means.class_means_for_run."""
    per_class = smallest_class_count(meta.train_targets, meta.num_classes)
    ckpt = teacher_ckpt_path(cfg) if cache else None
    device = torch.device(device)
    cuda = [] if device.type != "cuda" else [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):  # a run that finds the cache and one that computes it stay identical
        return load_or_compute_cost(ckpt, teacher, meta.num_classes, per_class,
                                    lambda: unaugmented_train_loader(cfg, device, bundle=bundle),
                                    f"{meta.name}-n{meta.num_train}", meta.num_train)


def prepare_wkd_cost(cfg, distiller, data, device, bundle=None, cache=True):
    """Install WKD-L's CKA cost in `distiller` when it needs one: rank 0 reads or computes it with the float32 teacher,
    the other ranks receive it. Anything else: nothing to do."""
    if not getattr(distiller, "needs_cost_pass", False):
        return
    cost = distiller.cost_matrix.new_zeros(distiller.cost_matrix.shape)

    def on_rank_0():
        if distributed.rank() == 0:
            cost.copy_(cost_for_run(cfg, distiller.teacher.model, data, device, bundle=bundle, cache=cache)[0])

    distributed.agree(on_rank_0)  # a failure on rank 0 stops every rank, before they wait for its matrix
    distributed.broadcast_([cost])
    distiller.set_cost_matrix(cost)
