"""FitNet (Romero et al., ICLR 2015): a regressor maps a middle student stage onto the teacher's, and the
student is trained so that the regressed map matches the teacher's ("hint") map.

loss = CE_WEIGHT * CE + FEAT_WEIGHT * mean((r(f_s) - f_t)^2), with f_s, f_t = features["feats"][HINT_LAYER]
(post-ReLU stage outputs, entry 0 the stem: HINT_LAYER 2 is the second stage, both networks the same index).
Defaults are mdistiller's CIFAR-100 settings (hint layer 2, CE 1, feat 100), trained in one stage with the
CE, as the published code does (the paper's separate hint pre-training stage is not used there).

The regressor r is the published one: conv -> BatchNorm -> ReLU, the conv chosen from the two maps' heights:
  - student twice the teacher's size: 3x3 conv, stride 2, padding 1;
  - student half the teacher's size: 4x4 transposed conv, stride 2, padding 1;
  - student at least as large: a conv with kernel (1 + Hs - Ht, 1 + Ws - Wt), i.e. 1x1 for equal sizes.
Any other pair of sizes is refused. The sizes come from one probe forward of an image of the dataset's size (built
without data, as tests do, 32x32: mdistiller's FITNET.INPUT_SIZE default and CIFAR's size). FITNET.PROBE says how:
  - "published": mdistiller's `get_feat_shapes` (distillers/_common.py) exactly: one torch.randn(1, 3, H, W) image
    drawn from the global generator on the CPU, through the student and then the teacher, both in *training* mode
    (nothing has called eval() on either when their FitNet is built), under torch.no_grad. Each BatchNorm of both
    networks therefore normalises that noise image with its own statistics and moves its running statistics one
    momentum step (0.1) towards them, num_batches_tracked 1. The student's moved statistics are soon overwritten by
    training; the teacher's are not: the teacher then distils in eval mode with these once-moved statistics for the
    whole run. mdistiller's draw is unseeded; ours comes from the run's seeded generator (the same noise on resume),
    and the draw shifts the generator for the regressor's initialisation that follows, as in mdistiller;
  - "clean" (the key's default): one zero image in eval mode, so no BatchNorm statistic and no random draw is
    touched (the same regressor).
The configs reproducing mdistiller's FitNet numbers (configs/cifar100/fitnet/) set "published".
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

logger = logging.getLogger("mdistiller")

PROBES = ("clean", "published")

_cfg = CN()
_cfg.HINT_LAYER = 2  # index into features["feats"] (0 is the stem)
# How the regressor is sized: "published" = mdistiller's probe (a random image through the student and the teacher
# in training mode: both models' BatchNorm running statistics move once); "clean" = a zero image in eval mode
_cfg.PROBE = "clean"
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 100.0


def size_matching_conv(s_shape, t_shape):
    """The conv of mdistiller's / RepDistiller's ConvReg mapping a (C, H, W) student map onto the teacher's: stride 2
    where the teacher's is half the size, a transposed conv where it is twice, else a kernel that shrinks the student's
    to the teacher's size; None where none fits (a teacher map larger, but not twice, the student's)."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    if 2 * s_h == t_h:
        return nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    return None


class HintRegressor(nn.Module):
    """conv (chosen from the two spatial sizes) -> BN -> ReLU, mapping the student's map onto the teacher's."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        (_, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        self.conv = size_matching_conv(s_shape, t_shape)
        if self.conv is None:
            raise ConfigError(
                f"config key FITNET.HINT_LAYER: no regressor maps the student's {s_h}x{s_w} map onto the "
                f"teacher's {t_h}x{t_w} (the teacher's may be at most twice, and otherwise no larger than, the "
                f"student's); choose a stage where the sizes fit")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def stage_shape(model, index, image_size):
    """(C, H, W) of features["feats"][index] for one image, without touching the model's BN statistics."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            _, feats = model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return tuple(feats["feats"][index].shape[1:])


def published_probe(student, teacher, image_size):
    """mdistiller's get_feat_shapes: ([(C, H, W)] of the student's features["feats"], the same of the teacher's) from
    one torch.randn(1, 3, image_size, image_size) image of the global generator, run through `student` and then
    `teacher` (plain models) in training mode under torch.no_grad, so both models' BatchNorm running statistics move
    as torch's training-mode BatchNorm moves them. Each model is returned to the mode it was in."""
    data = torch.randn(1, 3, image_size, image_size)  # CPU float32, as mdistiller draws it
    shapes = []
    for model in (student, teacher):
        was_training = model.training
        model.train()
        try:
            param = next(model.parameters())
            with torch.no_grad():
                _, feats = model(data.to(device=param.device, dtype=param.dtype))
        finally:
            model.train(was_training)
        shapes.append([tuple(f.shape[1:]) for f in feats["feats"]])
    return shapes[0], shapes[1]


def check_probe(section, probe):
    if probe not in PROBES:
        raise ConfigError(f"config key {section}.PROBE: one of {', '.join(PROBES)} (published: mdistiller's probe "
                          f"forward in training mode), got {probe!r}")


def log_published_probe(section):
    logger.info("%s.PROBE published: probed with one random image through the student and the teacher in training "
                "mode, as mdistiller's get_feat_shapes does (both models' BatchNorm running statistics moved once)",
                section)


def hint_loss(student_map, teacher_map):
    """Mean squared error over every element (batch, channel and position)."""
    return F.mse_loss(student_map, teacher_map)


def hint_shapes(section, probe, student, teacher, index, image_size):
    """(C, H, W) of features["feats"][index] of the student and the teacher, by the <section>.PROBE way: "published"
    (mdistiller's train-mode probe, logged) or "clean" (stage_shape)."""
    if probe == "published":
        shapes_s, shapes_t = published_probe(student, teacher, image_size)
        log_published_probe(section)
        return shapes_s[index], shapes_t[index]
    return stage_shape(student, index, image_size), stage_shape(teacher, index, image_size)


@DISTILLER_REGISTRY.register("FITNET", config=_cfg)
class FitNet(Distiller):
    ramped_terms = ("fitnet",)

    def __init__(self, *, student, teacher, image_size=32, hint_layer=2, ce_weight=1.0, feat_weight=100.0,
                 probe="clean"):
        super().__init__(student=student, teacher=teacher)
        check_probe("FITNET", probe)
        n_s, n_t = len(student.stage_channels()), len(self.teacher.stage_channels())
        if not 0 <= hint_layer < min(n_s, n_t):
            raise ConfigError(f"config key FITNET.HINT_LAYER: {hint_layer} is not a stage of both networks "
                              f"(student has {n_s} feature maps, teacher {n_t}); use 0..{min(n_s, n_t) - 1}")
        self.hint_layer, self.ce_weight, self.feat_weight = hint_layer, ce_weight, feat_weight
        s_shape, t_shape = hint_shapes("FITNET", probe, student, self.teacher.model, hint_layer, image_size)
        self.regressor = HintRegressor(s_shape, t_shape)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.FITNET
        image_size = data.image_size if data is not None else 32
        return {"image_size": image_size, "hint_layer": c.HINT_LAYER, "ce_weight": c.LOSS.CE_WEIGHT,
                "feat_weight": c.LOSS.FEAT_WEIGHT, "probe": c.PROBE}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.FITNET
        if c.HINT_LAYER < 0:
            raise ConfigError(f"config key FITNET.HINT_LAYER: must be >= 0 (0 is the stem), got {c.HINT_LAYER}")
        check_probe("FITNET", c.PROBE)

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        hint = hint_loss(self.regressor(features["feats"][self.hint_layer]), features_t["feats"][self.hint_layer])
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "fitnet": distill_loss(self.feat_weight * hint),
        }, features, logits_t, features_t)
