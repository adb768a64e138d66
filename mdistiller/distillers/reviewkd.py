"""ReviewKD, "Distilling knowledge via knowledge review" (Chen et al., CVPR 2021).

Each teacher stage is taught not by the student's same stage alone but by that stage fused with everything
deeper in the student (the "review"): the student's features are processed from the deepest to the shallowest,
and at every level an attention-based fusion (ABF) mixes the level's own (1x1-reduced) feature with the fused
result carried up from the level below it, with two per-pixel weights predicted from both. A 3x3 conv maps the
fused map to the teacher's channels, and the hierarchical context loss (HCL) compares it with the teacher's
feature at full size and after adaptive average pooling to 4x4, 2x2 and 1x1.

Which levels (docs/models.md, "Stage pairing", has the details and examples): the student's feature entries and
the teacher's post-stem stages, each followed by the pooled feature as a 1x1 map, the deepest K = min(counts)
of each paired shallowest first, as the published code selects them; teacher targets before their last ReLU.
Sizes need not agree (nearest resizing inside the fusion); the fusion width is min(MAX_MID_CHANNEL, the student's
deepest width).

loss = CE_WEIGHT * CE + min(epoch / WARMUP_EPOCHS, 1) * REVIEWKD_WEIGHT * HCL, summed over the levels.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .loss_ramp import warmup_factor
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.REVIEWKD_WEIGHT = 1.0  # DKD's CIFAR tables; mdistiller's CIFAR config uses 5.0
_cfg.WARMUP_EPOCHS = 20  # linear ramp of the ReviewKD term
_cfg.MAX_MID_CHANNEL = 512
_cfg.STU_PREACT = False  # student stages before their last ReLU (the published ImageNet setting)

HCL_LEVELS = (4, 2, 1)


def hcl_loss(fused_student, teacher_feats):
    """Hierarchical context loss, summed over levels.

    Per level: MSE at full size, plus MSE after adaptive-avg-pooling both maps to 4, 2 and 1; a pooled size is
    used only when it is smaller than the map, and each used one weighs half the previous (1, 1/2, 1/4, 1/8
    on an 8x8 map; 1, 1/2, 1/4 on 4x4; the full-size term alone on 1x1); divided by the sum of the weights.
    """
    total = 0.0
    for fs, ft in zip(fused_student, teacher_feats):
        loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= min(fs.shape[-2:]):
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused map carried up from the deeper levels."""

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None)
        for conv in (self.reduce[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the reference's init: unit-gain, keeps the scale

    def forward(self, x, residual, out_size):
        """(output in the teacher's channels and size, fused map to carry up to the next shallower level)."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, residual], dim=1))
            x = x * w[:, 0:1] + residual * w[:, 1:2]
        if x.shape[-2:] != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x


def review_levels(features, preact, stem):
    """Feature entries (with the stem entry when `stem`) then the pooled feature as a 1x1 map, shallowest
    first."""
    entries = features["preact_feats" if preact else "feats"]
    return list(entries if stem else entries[1:]) + [features["pooled_feat"][:, :, None, None]]


def review_channels(model, stem):
    """Channels of review_levels(..., stem) for this model."""
    channels = model.stage_channels()
    return (channels if stem else channels[1:]) + [model.feat_dim]


class ReviewFusion(nn.Module):
    """One ABF per level; the deepest level has nothing below it to fuse with."""

    def __init__(self, in_channels, out_channels, mid_channels):
        super().__init__()
        n = len(in_channels)
        self.abfs = nn.ModuleList(ABF(c_in, mid_channels, c_out, fuse=i < n - 1)
                                  for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))

    def forward(self, student_levels, out_sizes):
        """Fused student maps, shallowest first, each in its teacher level's channels and size."""
        outputs, residual = [None] * len(self.abfs), None
        for i in reversed(range(len(self.abfs))):
            outputs[i], residual = self.abfs[i](student_levels[i], residual, out_sizes[i])
        return outputs


@DISTILLER_REGISTRY.register("REVIEWKD", config=_cfg)
class ReviewKD(Distiller):
    ramped_terms = ("reviewkd",)
    own_ramp_keys = {"REVIEWKD.WARMUP_EPOCHS": "reviewkd"}

    def __init__(self, *, student, teacher, ce_weight=1.0, reviewkd_weight=1.0, warmup_epochs=20, max_mid_channel=512,
                 stu_preact=False):
        super().__init__(student=student, teacher=teacher)
        self.ce_weight, self.reviewkd_weight, self.warmup_epochs = ce_weight, reviewkd_weight, warmup_epochs
        self.stu_preact = stu_preact
        for role, model in (("STUDENT", student), ("TEACHER", self.teacher.model)):
            if not getattr(model, "feature_pyramid", True):  # e.g. a ViT's blocks, all at one token grid
                raise ConfigError(f"config key DISTILLER.{role}: REVIEWKD fuses a feature pyramid (each stage's map "
                                  f"smaller than the one before), and {getattr(model, 'library_name', role)}'s "
                                  "stage maps all have one size; pair CNNs, or use another method")
        c_s, c_t = review_channels(student, stem=True), review_channels(self.teacher, stem=False)
        self.num_levels = min(len(c_s), len(c_t))
        c_s, c_t = c_s[-self.num_levels:], c_t[-self.num_levels:]
        mid = min(max_mid_channel, c_s[-1])
        self.fusion = ReviewFusion(c_s, c_t, mid)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.REVIEWKD
        return {"ce_weight": c.LOSS.CE_WEIGHT, "reviewkd_weight": c.LOSS.REVIEWKD_WEIGHT,
                "warmup_epochs": c.WARMUP_EPOCHS, "max_mid_channel": c.MAX_MID_CHANNEL, "stu_preact": c.STU_PREACT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.REVIEWKD
        if c.WARMUP_EPOCHS < 0:
            raise ConfigError(f"config key REVIEWKD.WARMUP_EPOCHS: must be >= 0 epochs, got {c.WARMUP_EPOCHS}")
        if c.MAX_MID_CHANNEL < 1:
            raise ConfigError(f"config key REVIEWKD.MAX_MID_CHANNEL: must be >= 1, got {c.MAX_MID_CHANNEL}")

    def fused_and_targets(self, features, features_t):
        """(fused student maps, teacher maps) for the K paired levels, shallowest first."""
        k = self.num_levels
        student = review_levels(features, self.stu_preact, stem=True)[-k:]
        teacher = review_levels(features_t, preact=True, stem=False)[-k:]
        return self.fusion(student, [t.shape[-2:] for t in teacher]), teacher

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        fused, targets = self.fused_and_targets(features, features_t)
        ramp = warmup_factor(epoch, self.warmup_epochs)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "reviewkd": distill_loss(ramp * self.reviewkd_weight * hcl_loss(fused, targets)),
        }, features, logits_t, features_t)
