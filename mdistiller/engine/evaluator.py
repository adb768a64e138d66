"""Top-1 / top-5 accuracy of a model over a loader, as exact counts (summable across processes)."""

import contextlib

import torch
import torch.nn.functional as F

from ..utils.progress import bar


@torch.inference_mode()
def evaluate(model, loader, reduce_fn=None, speed=None, show=None):
    """Return {"top1", "top5", "loss", "num"}; `model(images)` returns logits or (logits, features).

    Counts are accumulated as tensors and only converted at the end, so there is one device sync per call.
    `reduce_fn`, if given, sums a tensor across processes (distributed evaluation). `speed`, the training run's
    SpeedPlan (engine/speed.py), if given: batches in its memory format, the forward under its autocast.
    `show`: draw an "eval" bar (None: on a terminal, rank 0; utils/progress.py)."""
    was_training = model.training
    model.eval()
    stats = None
    for images, labels, _ in bar(loader, desc="eval", unit="batch", show=show):
        if speed is not None:
            images = speed.batch(images)
        with speed.autocast() if speed is not None else contextlib.nullcontext():
            logits = model(images)
        if isinstance(logits, tuple):
            logits = logits[0]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(labels[:, None])
        batch = torch.stack([
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            F.cross_entropy(logits.float(), labels, reduction="sum").double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device),
        ])
        stats = batch if stats is None else stats + batch
    model.train(was_training)
    if stats is None:
        raise RuntimeError("evaluation loader yielded no batches")
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    top1, top5, loss, num = stats.tolist()
    return {"top1": 100.0 * top1 / num, "top5": 100.0 * top5 / num, "loss": loss / num, "num": int(num)}
