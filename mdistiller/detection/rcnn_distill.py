"""Distillation glue on the R-CNN box head of torchvision's Faster R-CNN (KD++ / DKD detection recipe).

The losses of KD++'s Detection/ code and of the DKD appendix act on the student's *sampled* proposals (after the
ROI sampler): the student's and the teacher's FPN features are both pooled on those proposals, and KD / DKD compare
the two 81-way box-classifier logits, the dino (KD++'s ND) term the two 1024-d box-head outputs. `RCNNDistillGlue` runs
the student's training forward step by step through its own submodules (transform, backbone, rpn,
roi_heads.select_training_samples / box_roi_pool / box_head / box_predictor, torchvision's fastrcnn_loss) so that
those intermediate tensors are exposed, and the frozen teacher on the same transformed image tensor and the same
proposals. The loss terms reuse the classification losses unchanged (kd_loss, dkd_loss, dino_loss).
"""

from dataclasses import dataclass, field
from functools import partial
from typing import List

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

from ..distillers.dkd import dkd_loss
from ..distillers.losses import distill_loss, kd_loss, task_loss
from ..distillers.plus_plus import dino_loss
from ..utils.errors import ConfigError

DETECTOR_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class DetectionStep:
    """One training forward: the student's standard losses and, on its sampled proposals (all images concatenated
    in order), the assigned labels and both models' box-head features and class logits; also both models' FPN
    outputs (levels "0".."3", "pool"; the teacher's without gradient) for ReviewKD, FitNet and FGFI on the features;
    the ground-truth boxes as the student's transform left them, and the student RPN's anchors (`student_anchors()`,
    computed on first use: only FGFI's imitation mask needs them)."""

    losses: dict
    proposals: List[torch.Tensor]
    labels: torch.Tensor
    student_features: torch.Tensor
    student_logits: torch.Tensor
    teacher_features: torch.Tensor
    teacher_logits: torch.Tensor
    image_sizes: list = field(default_factory=list)
    student_fpn: dict = field(default_factory=dict)
    teacher_fpn: dict = field(default_factory=dict)
    gt_boxes: list = field(default_factory=list)  # per image (N_i, 4) xyxy, in the batch tensor's pixel coordinates
    anchor_source: object = field(default=None, repr=False)  # () -> student_anchors()'s list
    _anchors: list = field(default=None, init=False, repr=False)

    def student_anchors(self):
        """The student RPN's anchors, one (H * W * A, 4) tensor per FPN level in student_fpn's order, row-major over
        the level's (y, x) positions with the A anchors of a position consecutive; the same for every image of the
        batch (torchvision's anchors depend only on the padded batch's size)."""
        if self._anchors is None:
            if self.anchor_source is None:
                raise ValueError("this DetectionStep carries no anchors: produce it with RCNNDistillGlue.forward")
            self._anchors = self.anchor_source()
        return self._anchors


def level_anchors(anchor_generator, image_list, feature_maps):
    """The anchors torchvision's RPN uses on `feature_maps` (its AnchorGenerator, called as the RPN calls it), split
    per level: [(H_l * W_l * A_l, 4)]. One image's: every image of a batch has the same."""
    first = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])
    anchors = anchor_generator(first, feature_maps)[0]
    counts = [m.shape[-2] * m.shape[-1] * a
              for m, a in zip(feature_maps, anchor_generator.num_anchors_per_location())]
    return list(anchors.split(counts))


def _num_classes(model):
    return model.roi_heads.box_predictor.cls_score.out_features


def _check_pair(student, teacher):
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, FasterRCNN):
            raise ConfigError(f"detection distillation needs torchvision FasterRCNN models; the {name} is a "
                              f"{type(model).__name__} (build it with mdistiller.detection.models.build_faster_rcnn)")
    if _num_classes(student) != _num_classes(teacher):
        raise ConfigError(f"student and teacher detectors have {_num_classes(student)} and {_num_classes(teacher)} "
                          f"classes: give both the same label set (COCO: 81 with background 0; a 91-class "
                          f"torchvision COCO checkpoint must be mapped to 81 first)")


def _same_normalisation(student, teacher):
    s, t = student.transform, teacher.transform
    return list(s.image_mean) == list(t.image_mean) and list(s.image_std) == list(t.image_std)


def teacher_input(image_list, student_transform, teacher_transform, flip_channels=False):
    """The student's normalised, resized, padded batch re-expressed in the teacher's normalisation (and channel
    order if flip_channels, e.g. a Detectron2-zoo BGR teacher), padding zero again as each model's own transform
    pads it. Resizing commutes with the per-channel affine map, so this equals the teacher's own transform of the
    same images at the student's size."""
    x = image_list.tensors

    def channel(values):
        return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    raw = x * channel(student_transform.image_std) + channel(student_transform.image_mean)
    if flip_channels:
        raw = raw.flip(1)
    out = (raw - channel(teacher_transform.image_mean)) / channel(teacher_transform.image_std)
    mask = torch.zeros_like(out[:, :1])
    for index, (h, w) in enumerate(image_list.image_sizes):
        mask[index, :, :h, :w] = 1
    return out * mask


class RCNNDistillGlue(nn.Module):
    """Student Faster R-CNN (trained) + frozen teacher Faster R-CNN, exposing what the box-head losses need.

    The teacher sees the student's transformed batch (same size, so the student's proposals need no rescaling),
    renormalised when its transform's image_mean/image_std differ (teacher_input); teacher_flip_channels reverses
    the channel order for a teacher trained on BGR input."""

    def __init__(self, student, teacher, teacher_flip_channels=False):
        """`teacher` None: the student's training forward alone (a baseline or a teacher being trained); the
        step's teacher fields are then None."""
        super().__init__()
        _check_pair(student, teacher if teacher is not None else student)
        self.student, self.teacher = student, teacher
        self.teacher_flip_channels = teacher_flip_channels
        self.renormalise = teacher is not None and (teacher_flip_channels or not _same_normalisation(student, teacher))
        if teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the glue's mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images, targets):
        """images: list of (3, H, W) float tensors in [0, 1]; targets: list of {"boxes" (N, 4) xyxy, "labels" (N,)
        with categories 1..80}. Returns a DetectionStep. The student must be in training mode."""
        s = self.student
        if not s.training:
            raise RuntimeError("RCNNDistillGlue.forward is a training step: call .train() first (evaluate the "
                               "student model itself)")
        image_list, targets = s.transform(images, targets)
        for index, target in enumerate(targets):
            boxes = target["boxes"]
            if boxes.numel() and (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError(f"image {index} has a box with zero or negative width or height: drop it from the "
                                 f"targets")
        features = s.backbone(image_list.tensors)
        proposals, rpn_losses = s.rpn(image_list, features, targets)
        heads = s.roi_heads
        proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
        logits, box_regression = heads.box_predictor(box_features)
        labels = torch.cat(labels, dim=0)
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, box_regression, [labels],
                                                      [torch.cat(regression_targets, dim=0)])
        teacher_fpn, teacher_features, teacher_logits = {}, None, None
        if self.teacher is not None:
            teacher_fpn = self.teacher_fpn(image_list)
            teacher_features, teacher_logits = self.teacher_box_outputs(image_list, proposals, teacher_fpn)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **rpn_losses}
        return DetectionStep(losses, proposals, labels, box_features, logits, teacher_features, teacher_logits,
                             list(image_list.image_sizes), features, teacher_fpn, [t["boxes"] for t in targets],
                             partial(level_anchors, s.rpn.anchor_generator, image_list, list(features.values())))

    @torch.no_grad()
    def teacher_fpn(self, image_list):
        """The teacher's FPN outputs on the student's batch, in the teacher's input convention."""
        t = self.teacher
        tensors = teacher_input(image_list, self.student.transform, t.transform, self.teacher_flip_channels) \
            if self.renormalise else image_list.tensors
        return t.backbone(tensors)

    @torch.no_grad()
    def teacher_box_outputs(self, image_list, proposals, features=None):
        """The teacher's box-head features and class logits on `proposals` (boxes in image_list's coordinates);
        `features`: its FPN outputs when already computed (teacher_fpn)."""
        t = self.teacher
        if features is None:
            features = self.teacher_fpn(image_list)
        pooled = t.roi_heads.box_roi_pool(features, [p.detach() for p in proposals], image_list.image_sizes)
        box_features = t.roi_heads.box_head(pooled)
        logits, _ = t.roi_heads.box_predictor(box_features)
        return box_features, logits


def detector_task_terms(step):
    """The student's four standard Faster R-CNN losses as task terms (Detectron2 / torchvision weights 1)."""
    return {name: task_loss(step.losses[name]) for name in DETECTOR_LOSSES}


def kd_term(step, temperature=1.0, weight=1.0):
    """KD on the 81-way box logits, batchmean over the sampled proposals (KD++ detection: T 1)."""
    return distill_loss(weight * kd_loss(step.student_logits, step.teacher_logits, temperature))


def dkd_term(step, alpha=1.0, beta=0.25, temperature=1.0, weight=1.0):
    """DKD on the box logits with the proposals' assigned labels as targets (DKD appendix: 1.0, 0.25, T 1)."""
    return distill_loss(weight * dkd_loss(step.student_logits, step.teacher_logits, step.labels, alpha, beta,
                                          temperature))


def dino_term(step, class_means, weight=1.0):
    """KD++'s dino (ND) term on the 1024-d box features, class means (81, 1024) in our label order."""
    if class_means.shape != (step.student_logits.shape[1], step.teacher_features.shape[1]):
        raise ValueError(f"class means of shape {tuple(class_means.shape)} do not fit "
                         f"{step.student_logits.shape[1]} classes x {step.teacher_features.shape[1]} features")
    return distill_loss(weight * dino_loss(step.student_features, step.teacher_features, class_means, step.labels))


class BoxFeatureClassMeans:
    """Teacher class means as KD++'s detection code collects them: the teacher's box-head features of the sampled
    proposals, summed per assigned class (background included) over training steps, divided by the counts and
    rounded (4 decimals in their files)."""

    def __init__(self, num_classes, dim):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, step):
        self.add(step.labels, step.teacher_features)

    def add(self, labels, features):
        """Sum `features` (N, D) into the rows of their `labels` (N,)."""
        labels = labels.detach().cpu()
        self.sums.index_add_(0, labels, features.detach().double().cpu())
        self.counts += torch.bincount(labels, minlength=self.counts.numel())

    def means(self, decimals=4):
        means = self.sums / self.counts.clamp_min(1).unsqueeze(1).double()
        if decimals >= 0:
            means = torch.round(means, decimals=decimals)
        return means.float()
