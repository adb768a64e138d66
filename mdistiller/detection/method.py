"""The detection distiller: a student Faster R-CNN, an optional frozen teacher and the terms DISTILLER.TYPE adds
to the detector's four losses (config.METHODS). The maths is the classification methods' (kd_loss, dkd_loss,
dino_loss, hcl_loss through rcnn_distill and review); this module only chooses and weights them, and gives the
loop the interface of a classification Distiller (train_forward -> StepOutput, learnable state without the
teacher), so the same Trainer, update rules (SGD, DOT), hooks, checkpoints and DDP wrapper run it."""

import torch

from ..distillers.base import Distiller
from ..distillers.losses import StepOutput
from ..utils import distributed
from .models import BOX_FEATURE_DIM, NUM_CLASSES
from .rcnn_distill import BoxFeatureClassMeans, RCNNDistillGlue, detector_task_terms, dkd_term, kd_term, nd_term
from .review import FPNReview, reviewkd_term


class DetectionDistiller(RCNNDistillGlue):
    def __init__(self, student, teacher=None, terms=(), kd_weight=1.0, kd_temperature=1.0, dkd_alpha=1.0,
                 dkd_beta=0.25, dkd_temperature=1.0, nd_weight=1.0, reviewkd_weight=1.0,
                 teacher_flip_channels=False):
        """`terms`: the distillation terms to add ("kd", "dkd", "nd", "reviewkd"); the teacher is needed by all."""
        if terms and teacher is None:
            raise ValueError(f"detection terms {', '.join(terms)} need a teacher")
        super().__init__(student, teacher, teacher_flip_channels)
        self.terms = tuple(terms)
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.dkd_alpha, self.dkd_beta, self.dkd_temperature = dkd_alpha, dkd_beta, dkd_temperature
        self.nd_weight, self.reviewkd_weight = nd_weight, reviewkd_weight
        self.review = FPNReview() if "reviewkd" in self.terms else None
        if "nd" in self.terms:  # set before the first step (prepare); saved with the learnable state
            self.register_buffer("class_means", torch.zeros(NUM_CLASSES, BOX_FEATURE_DIM))

    def train_forward(self, images, targets, epoch=None, index=None):
        """One training batch (lists of images and targets) -> StepOutput: the four detector losses as task terms
        plus the method's distillation terms; logits are the student's box logits on its sampled proposals."""
        weight = self.student.roi_heads.box_predictor.cls_score.weight
        images = [im.to(weight.device, weight.dtype, non_blocking=True) for im in images]
        device = weight.device
        targets = [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        step = self(images, targets)
        terms = detector_task_terms(step)
        if "kd" in self.terms:
            terms["kd"] = kd_term(step, self.kd_temperature, self.kd_weight)
        if "dkd" in self.terms:
            terms["dkd"] = dkd_term(step, self.dkd_alpha, self.dkd_beta, self.dkd_temperature)
        if "nd" in self.terms:
            terms["nd"] = nd_term(step, self.class_means, self.nd_weight)
        if "reviewkd" in self.terms:
            terms["reviewkd"] = reviewkd_term(step, self.review, self.reviewkd_weight)
        return StepOutput(step.student_logits, terms, teacher_logits=step.teacher_logits)

    # The state the loop trains and saves, as for a classification method (the teacher comes from its own file).
    learnable_parameters = Distiller.learnable_parameters
    learnable_state_dict = Distiller.learnable_state_dict
    load_learnable_state_dict = Distiller.load_learnable_state_dict


@torch.no_grad()
def collect_class_means(teacher, batches, iters, device):
    """KD++'s detection class means: the teacher's box-head features of sampled proposals (its own RPN's, plus the
    ground-truth boxes, as the ROI sampler takes them), summed per assigned class over `iters` training batches of
    every rank and divided by the counts, rounded to 4 decimals as KD++'s files are. (81, 1024), our label order."""
    acc = BoxFeatureClassMeans(NUM_CLASSES, BOX_FEATURE_DIM)
    was_training = teacher.transform.training
    teacher.transform.train()  # training-time input: the loader resized the images already (_skip_resize)
    heads = teacher.roi_heads
    try:
        for it, (images, targets, _) in enumerate(batches):
            if it >= iters:
                break
            dtype = heads.box_predictor.cls_score.weight.dtype
            images = [im.to(device, dtype) for im in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            image_list, targets = teacher.transform(images, targets)
            features = teacher.backbone(image_list.tensors)
            proposals, _ = teacher.rpn(image_list, features)
            proposals, _, labels, _ = heads.select_training_samples(proposals, targets)
            box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
            acc.add(torch.cat(labels), box_features)
    finally:
        teacher.transform.train(was_training)
    sums = distributed.all_reduce_sum(acc.sums.to(device)).cpu()
    counts = distributed.all_reduce_sum(acc.counts.to(device)).cpu()
    acc.sums, acc.counts = sums, counts
    return acc.means()

