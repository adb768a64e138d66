"""The detection distiller: a student Faster R-CNN, an optional frozen teacher and the registered loss terms its
method adds to the detector's four losses (terms.py). It gives the loop the interface of a classification
Distiller (train_forward -> StepOutput, learnable state without the teacher), so the same Trainer, update rules
(SGD, DOT), hooks, checkpoints and DDP wrapper run it."""

import torch
import torch.nn as nn

from ..distillers.base import Distiller
from ..distillers.losses import StepOutput
from ..utils import distributed
from .models import BOX_FEATURE_DIM, NUM_CLASSES
from .rcnn_distill import BoxFeatureClassMeans, RCNNDistillGlue, detector_task_terms
from .terms import DETECTION_TERM_REGISTRY

# learnable-state keys of the older checkpoint layout (terms as attributes of the distiller) -> the terms' modules
_RENAMED_STATE = (("class_means", "terms.dino.class_means"), ("review.", "terms.reviewkd.review."))


class DetectionDistiller(RCNNDistillGlue):
    evaluates_student_alone = True  # the student detector is the whole trained model (Distiller's contract)

    def __init__(self, *, student, teacher=None, terms=None, teacher_flip_channels=False):
        """`terms`: {name: term module} (terms.py) added to the detector's losses; all of them need the teacher.
        They are summed in their registration order."""
        terms = dict(terms or {})
        if terms and teacher is None:
            raise ValueError(f"detection terms {', '.join(terms)} need a teacher")
        super().__init__(student, teacher, teacher_flip_channels)
        self.terms = nn.ModuleDict({name: terms[name] for name in DETECTION_TERM_REGISTRY.in_order(terms)})
        unknown = set(terms) - set(self.terms)
        if unknown:
            raise ValueError(f"unregistered detection terms {sorted(unknown)}: register them in "
                             f"DETECTION_TERM_REGISTRY")

    def prepare_capture(self):
        return ("a detector's proposals and sampled regions vary in number with the image (shapes that depend on "
                "the data)")

    def unused_parameters(self):
        return None  # every step reaches the whole student detector and every term (Distiller's contract)

    def train_forward(self, images, targets, epoch=None, index=None):
        """One training batch (lists of images and targets) -> StepOutput: the four detector losses as task terms
        plus the method's distillation terms; logits are the student's box logits on its sampled proposals."""
        weight = self.student.roi_heads.box_predictor.cls_score.weight
        images = [im.to(weight.device, weight.dtype, non_blocking=True) for im in images]
        device = weight.device
        targets = [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        step = self(images, targets)
        terms = detector_task_terms(step)
        for name, term in self.terms.items():
            terms[name] = term(step)
        return StepOutput(step.student_logits, terms, teacher_logits=step.teacher_logits)

    # The state the loop trains and saves, as for a classification method (the teacher comes from its own file).
    learnable_parameters = Distiller.learnable_parameters
    learnable_state_dict = Distiller.learnable_state_dict

    def load_learnable_state_dict(self, state):
        """Also reads the layout of checkpoints whose terms were attributes of the distiller."""
        fixed = {}
        for key, value in state.items():
            for old, new in _RENAMED_STATE:
                if key == old or (old.endswith(".") and key.startswith(old)):
                    key = new + key[len(old):]
                    break
            fixed[key] = value
        Distiller.load_learnable_state_dict(self, fixed)


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
