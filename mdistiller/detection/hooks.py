"""What a detection run has around the loop instead of the classification ones: the learning rate by iteration
(Detectron2's WarmupMultiStepLR), COCO box AP on the test split after an epoch, and the epoch's log line."""

import bisect
import logging

import torch

from ..engine.hooks import EvaluationHook, HookBase
from ..utils import distributed
from .coco_eval import METRICS, evaluate
from .data import annotation_path, to_original

logger = logging.getLogger("mdistiller")


class IterLRSchedule:
    """LR of global iteration i (0-based): lr x gamma^(number of steps <= i), times a linear warm-up factor
    f + (1 - f) i / warmup_iters for i < warmup_iters (Detectron2's WarmupMultiStepLR, "linear")."""

    def __init__(self, *, lr, steps, gamma, warmup_iters=0, warmup_factor=0.001):
        self.lr, self.steps, self.gamma = lr, tuple(steps), gamma
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor

    @classmethod
    def from_config(cls, cfg):
        d = cfg.DETECTION
        return {"lr": cfg.SOLVER.LR, "steps": d.STEPS, "gamma": cfg.SOLVER.LR_DECAY_RATE,
                "warmup_iters": d.WARMUP_ITERS, "warmup_factor": d.WARMUP_FACTOR}

    def at(self, i):
        lr = self.lr * self.gamma ** bisect.bisect_right(self.steps, i)
        if i < self.warmup_iters:
            alpha = i / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr

    def __call__(self, epoch, iteration, iters_per_epoch):
        return self.at((epoch - 1) * iters_per_epoch + iteration)


def predictions_of(student, loader, device):
    """The student's detections on every image of `loader`, boxes in the original image's coordinates."""
    out = []
    student.eval()
    with torch.no_grad():
        for images, targets in loader:
            results = student([im.to(device) for im in images])
            for result, target in zip(results, targets):
                out.append({"image_id": target["image_id"],
                            "boxes": to_original(result["boxes"], target["size"], target["orig_size"]).cpu(),
                            "scores": result["scores"].cpu(), "labels": result["labels"].cpu()})
    return out


class COCOEvalHook(EvaluationHook):
    """Box AP of the student (pycocotools) after every `period`-th epoch and the last: each rank detects on its
    shard of the test split, rank 0 scores all of them and every rank gets the result. Keeps the best and the last;
    the record gets test_AP, test_AP50, ... (nan where an area range has no ground truth, as in Detectron2)."""

    metric = "AP"

    def __init__(self, *, student, loader, annotations, category_ids, image_ids, device, period=1):
        """`annotations`: the test split's COCO file; `category_ids`: the COCO id of each label 1..80;
        `image_ids`: every test image (the ranks' shards together); `period`: evaluate every this many epochs."""
        self.student, self.loader, self.annotations = student, loader, annotations
        self.category_ids, self.image_ids, self.device, self.period = category_ids, image_ids, device, period
        self.best = {"AP": -1.0, "epoch": 0}
        self.last = {name: None for name in METRICS}

    @classmethod
    def from_config(cls, cfg):
        return {"annotations": annotation_path(cfg.DATASET.ROOT, "val"), "period": cfg.DETECTION.EVAL_PERIOD}

    def evaluate(self):
        mine = predictions_of(self.student, self.loader, self.device)
        gathered = distributed.all_gather_objects(mine)

        def score():
            if distributed.rank() != 0:
                return None
            return evaluate([p for part in gathered for p in part], self.annotations, self.category_ids,
                            self.image_ids)

        return distributed.broadcast_object(distributed.agree(score))

    def end_of_epoch(self, record):
        epoch = record["epoch"]
        if epoch % self.period and epoch != self.trainer.max_epochs:
            return
        result = self.evaluate()
        self.last = dict(result)
        if result["AP"] > self.best["AP"]:
            self.best = {"AP": result["AP"], "epoch": epoch}
        record.update({f"test_{name}": value for name, value in result.items()})
        record["best_AP"] = self.best["AP"]

    def summary_fields(self):
        return {"best_AP": self.best["AP"], "best_epoch": self.best["epoch"],
                **{f"last_{name}": self.last[name] for name in METRICS}}



class DetectionLogHook(HookBase):
    """The epoch's line in the log."""

    def after_epoch(self, record):
        ap = (f"  AP {record['test_AP']:.2f}  AP50 {record['test_AP50']:.2f}  best AP {record['best_AP']:.2f}"
              if "test_AP" in record else "")
        logger.info("epoch %d/%d (iteration %d)  lr %.5f  train_loss %.4f%s  %.1f img/s", record["epoch"],
                    self.trainer.max_epochs, self.trainer.global_step, record["lr"], record["train_loss"], ap,
                    record["images_per_s"])
