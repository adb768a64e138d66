"""Teacher class means (KD++): the mean penultimate teacher feature of each class over the training set.

They cost one teacher pass over the training set, which on ImageNet is most of an epoch, and depend only on
the teacher's weights and on which images are averaged. So they are cached in a file next to the teacher
checkpoint, named after the checkpoint's content hash (not its name or mtime: re-training a teacher into the
same path must not reuse stale means) and the data they were averaged over:

    <checkpoint>.class_means.<dataset>-n<num images>[-aug][-r<decimals>].<sha256 of the checkpoint, 16 hex>.pt

Two recipes (DINO.CLASS_MEANS_AUGMENT, DINO.CLASS_MEANS_DECIMALS), each with its own cache name: the authors'
(the default) averages the teacher's features of *augmented* training images - their script iterates the training
set with its training transform, teacher in eval mode - rounding each feature value and each mean to 4 decimals;
the other averages un-augmented images without rounding. The augmented pass draws its crops and flips from a fixed
seed (data/unaugmented.augmented_train_loader), so it is the same for every run and every EXPERIMENT.SEED.

holding {"format", "class_means" (C, D) float32, "class_counts" (C,) int64, "num_classes", "dim", "num_train",
"checkpoint_sha256", "teacher", "dataset"}. A cache whose classes, dimension, image count or hash do not match
is recomputed and rewritten; when a new cache is written, caches of older contents of the same checkpoint (same
data tag, other hash) are removed.
"""

import os
import time

import torch

from ..data.fingerprint import file_sha256
from ..data.unaugmented import augmented_train_loader, unaugmented_train_loader
from ..models.teacher_ckpt import teacher_ckpt_path
from ..utils.checkpoint import atomic_save, load_file, remove_stale_caches
from ..utils.logger import info as log_info
from ..utils.progress import bar

CACHE_FORMAT = "mdistiller-class-means-v1"


def _info(message):
    """To the run's log (console and train.log, in order with the run's other lines) during a run; to stderr from
    tools/compute_class_means.py, which has no run log."""
    log_info(message)


def cache_path(ckpt_path, sha256, tag):
    return f"{ckpt_path}.class_means.{tag}.{sha256[:16]}.pt"


@torch.no_grad()
def compute_class_means(teacher, batches, num_classes, decimals=-1):
    """(means (C, D) float32, counts (C,) int64) of teacher(images)[1]["pooled_feat"] per label.

    Sums are accumulated in float64 so the result does not depend on the batch size beyond float32 rounding
    of the features themselves. A class without images gets a zero mean (its dino term is then constant).
    decimals >= 0 rounds every feature value, and every mean, to that many decimals (the authors' script)."""
    was_training = teacher.training
    teacher.eval()
    sums, counts = None, None
    for batch in bar(batches, desc="teacher class means", unit="batch"):
        images, labels = batch[0], batch[1]
        feats = teacher(images)[1]["pooled_feat"].double()
        if decimals >= 0:
            feats = torch.round(feats, decimals=decimals)
        if sums is None:
            sums = feats.new_zeros(num_classes, feats.shape[1])
            counts = torch.zeros(num_classes, dtype=torch.int64, device=feats.device)
        labels = labels.to(feats.device)
        sums.index_add_(0, labels, feats)
        counts += torch.bincount(labels, minlength=num_classes)
    teacher.train(was_training)
    if sums is None:
        raise ValueError("no training images to compute teacher class means from")
    means = sums / counts.clamp_min(1).unsqueeze(1).double()
    if decimals >= 0:
        means = torch.round(means, decimals=decimals)
    return means.float().cpu(), counts.cpu()


def _usable(cache, num_classes, dim, num_train, sha256):
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT:
        return "not a class-means file"
    for key, want in (("num_classes", num_classes), ("dim", dim), ("num_train", num_train),
                      ("checkpoint_sha256", sha256)):
        if want is not None and cache.get(key) != want:
            return f"{key} {cache.get(key)} != {want}"
    means = cache.get("class_means")
    if not torch.is_tensor(means) or tuple(means.shape) != (cache["num_classes"], cache["dim"]):
        return "malformed class_means"
    return None


def load_or_compute_class_means(ckpt_path, teacher, num_classes, batches_fn, tag, num_train=None,
                                force=False, decimals=-1, what="no augmentation"):
    """Class means for the teacher loaded from `ckpt_path`: from the cache when it matches, else computed from
    `batches_fn()` (an iterable of (images, labels, ...)) and cached. Returns (means, counts, cache path).
    `ckpt_path` None (a teacher held in memory): computed, not cached (cache path None)."""
    if ckpt_path is None:
        means, counts = compute_class_means(teacher, batches_fn(), num_classes, decimals)
        return means, counts, None
    sha = file_sha256(ckpt_path)
    path = cache_path(ckpt_path, sha, tag)
    dim = teacher.feat_dim
    if os.path.isfile(path) and not force:
        try:
            cache = load_file(path, "class-means cache")
            problem = _usable(cache, num_classes, dim, num_train, sha)
        except Exception as e:  # unreadable or truncated: recompute rather than stop the run
            problem = f"unreadable ({type(e).__name__})"
        if problem is None:
            _info(f"teacher class means: loaded from {path}")
            return cache["class_means"].float(), cache["class_counts"].long(), path
        _info(f"teacher class means: cache {path} does not match ({problem}); recomputing")
    _info(f"teacher class means: computing them over the training set (one teacher pass, {what})")
    start = time.perf_counter()
    means, counts = compute_class_means(teacher, batches_fn(), num_classes, decimals)
    if num_train is not None and int(counts.sum()) != num_train:
        raise RuntimeError(f"class-means pass saw {int(counts.sum())} images, the training set has {num_train}")
    cache = {"format": CACHE_FORMAT, "class_means": means, "class_counts": counts, "num_classes": num_classes,
             "dim": int(means.shape[1]), "num_train": int(counts.sum()), "checkpoint_sha256": sha,
             "teacher": type(teacher).__name__, "dataset": tag}
    try:
        atomic_save(cache, path)
        remove_stale_caches(path, ckpt_path, "class_means", tag)
        where = f"cached in {path}"
    except OSError as e:  # a read-only checkpoint folder costs a recomputation next time, not the run
        where = f"not cached ({path}: {e})"
    _info(f"teacher class means: {int(counts.sum())} images, {num_classes} classes, dim {means.shape[1]}, "
          f"{time.perf_counter() - start:.1f} s; {where}")
    return means, counts, path


def class_means_for_run(cfg, teacher, meta, device, force=False, bundle=None, cache=True):
    """The class means of this run's teacher over this run's (subset) training set, cached by checkpoint hash.
    `bundle`: the in-memory DatasetBundle the run trains on instead of DATASET.TYPE's files; `cache` False: the
    teacher's weights are not DISTILLER.TEACHER's checkpoint (held in memory), nothing is read or written."""
    ckpt = teacher_ckpt_path(cfg) if cache else None
    augment, decimals = cfg.DINO.CLASS_MEANS_AUGMENT, cfg.DINO.CLASS_MEANS_DECIMALS
    tag = class_means_tag(meta, augment, decimals)
    loader = augmented_train_loader if augment else unaugmented_train_loader
    what = "training augmentation, fixed seed" if augment else "no augmentation"
    if decimals >= 0:
        what += f", rounded to {decimals} decimals"
    # The pass draws no random numbers today; the fork keeps it so for any loader, so that a run which finds the
    # cache and one which computes it stay identical.
    device = torch.device(device)
    cuda = [] if device.type != "cuda" else [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        return load_or_compute_class_means(ckpt, teacher, meta.num_classes, lambda: loader(cfg, device, bundle=bundle), tag,
                                           num_train=meta.num_train, force=force, decimals=decimals, what=what)


def class_means_tag(meta, augment, decimals):
    """The data part of the cache name: which images (dataset, count), whether augmented, how rounded."""
    return f"{meta.name}-n{meta.num_train}" + ("-aug" if augment else "") + (f"-r{decimals}" if decimals >= 0 else "")
