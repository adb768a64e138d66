"""ReviewKD on the FPN outputs of torchvision's Faster R-CNN (the detection recipe of ReviewKD, mdistiller and KD++).

The five FPN levels ("0".."3" = P2..P5 and "pool" = P6, 256 channels each) are the "stages": the student's levels
go through the classification ReviewKD's ABF fusion (in 256, mid 256, out 256, deepest level first, each fused map
carried up to the next shallower level) and the hierarchical context loss compares the fused maps with the
teacher's FPN outputs level by level. Student and teacher see the same batch size, so the shapes agree per level.
The building blocks (ReviewFusion/ABF, hcl_loss) are the classification ones, unchanged. hcl_loss pools to a size
only below min(height, width), the reference only below the height; the two agree whenever every level is at
least 5 pixels each way, as at Detectron2's input sizes (short side 640 or more).

Sums of terms, no new code: ReviewKD+DKD (mdistiller) = reviewkd_term + rcnn_distill.dkd_term; ReviewKD++ (KD++
table 3) = reviewkd_term + rcnn_distill.nd_term (the released code weights ND with KD.NDKD.ND_WEIGHT, 1.0).
The FPNReview's parameters are trained with the student: give them to the optimizer.
"""

import torch.nn as nn

from ..distillers.losses import distill_loss
from ..distillers.reviewkd import ReviewFusion, hcl_loss

FPN_LEVELS = ("0", "1", "2", "3", "pool")
FPN_CHANNELS = 256

# HCL weight per (teacher, student): KD++ table 3's configs (kdpp_recipes.md 3.2)
REVIEWKD_WEIGHTS = {("resnet101", "resnet18"): 1.2, ("resnet101", "resnet50"): 1.0, ("resnet50", "mobilenet_v2"): 2.0}
REVIEWKD_PP_WEIGHTS = {("resnet101", "resnet18"): 1.2, ("resnet101", "resnet50"): 1.4,
                       ("resnet50", "mobilenet_v2"): 2.2}


class FPNReview(nn.Module):
    """The learnable ABF fusion over the student's FPN levels (one ABF per level, the deepest without fusion)."""

    def __init__(self, channels=FPN_CHANNELS, mid_channels=FPN_CHANNELS, num_levels=len(FPN_LEVELS)):
        super().__init__()
        self.num_levels = num_levels
        self.fusion = ReviewFusion([channels] * num_levels, [channels] * num_levels, mid_channels)

    def forward(self, student_maps):
        """Fused student maps, shallowest level first, each in its level's own size."""
        if len(student_maps) != self.num_levels:
            raise ValueError(f"FPNReview was built for {self.num_levels} FPN levels and got {len(student_maps)}: "
                             f"build it with num_levels={len(student_maps)}")
        return self.fusion(list(student_maps), [m.shape[-2:] for m in student_maps])


def _levels(step):
    if not step.student_fpn or not step.teacher_fpn:
        raise ValueError("this DetectionStep carries no FPN outputs: produce it with RCNNDistillGlue.forward")
    if list(step.student_fpn) != list(step.teacher_fpn):
        raise ValueError(f"student FPN levels {list(step.student_fpn)} and teacher FPN levels "
                         f"{list(step.teacher_fpn)} differ: both detectors need the same FPN (build_faster_rcnn)")
    student, teacher = list(step.student_fpn.values()), list(step.teacher_fpn.values())
    for name, s, t in zip(step.student_fpn, student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"FPN level {name!r}: student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                             f"differ: both FPNs need {FPN_CHANNELS} channels and the same input batch")
    return student, teacher


def reviewkd_term(step, review, weight=1.0):
    """weight * HCL(review(student FPN), teacher FPN), summed over the levels (mdistiller's loss_reviewkd)."""
    student, teacher = _levels(step)
    return distill_loss(weight * hcl_loss(review(student), teacher))
