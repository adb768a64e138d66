"""VID, variational information distillation (Ahn et al., CVPR 2019): maximise a variational lower bound on the
mutual information between student and teacher features.

Each teacher stage t is modelled as a Gaussian whose mean a small regressor predicts from the paired student
stage s and whose per-channel variance is learned: loss = CE_WEIGHT * CE + FEAT_WEIGHT * sum over stage pairs of
mean(0.5 * ((mu(s) - t)^2 / var + log var)), var = log(1 + exp(alpha)) + EPS per teacher channel. The regressor
is conv1x1(C_s, C_t) - ReLU - conv1x1(C_t, C_t) - ReLU - conv1x1(C_t, C_t), no biases; alpha starts where
var = INIT_PRED_VAR. Defaults are mdistiller's CIFAR-100 settings (engine/cfg.py: CE 1, FEAT 1, EPS 1e-5, initial
variance 5).

As mdistiller's VID.py computes it:
  - stages: the entries of features["feats"] after the stem, zipped from the shallowest one (a longer list loses
    its deepest stages; mdistiller fails when the student has more stages than the teacher);
  - where a pair's spatial sizes differ, the larger map is adaptive-average-pooled to the smaller size first
    (mdistiller pools to a square of the smaller height; we pool height and width separately, the same for
    square maps) - as AT does;
  - the mean is over batch, channels and positions; the stage losses are summed.
Where we differ: mdistiller keeps alpha in a plain Python list, so its optimizer never sees it and the variance
stays at its initial value for the whole run. The paper, the authors' code and RepDistiller (whose runs give the
CRD-table VID numbers) learn it, and so do we (VID.LEARN_VARIANCE True); False keeps it fixed (a parameter
without gradient), which is mdistiller's behaviour. Channel counts come from `stage_channels()` instead of a probe
forward (mdistiller's INPUT_SIZE key is therefore not needed).

The probe's side effect, VID.PROBE: mdistiller sizes VID's regressors with `get_feat_shapes`, one random image
through the student and the teacher in training mode under no_grad, which moves both models' BatchNorm running
statistics once (the teacher then distils in eval mode with them for the whole run). "published" runs that very
probe (fitnet.published_probe: a torch.randn(1, 3, H, W) image of the run's seeded generator, H = W the dataset's
image size, mdistiller's VID.INPUT_SIZE (32, 32) on CIFAR) before the regressors are built; its shapes are not needed.
"clean" (the key's default) runs no probe. The configs reproducing mdistiller's VID numbers (configs/cifar100/vid/)
set "published".
"""

import math

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .at import matching_size, paired_stages
from .base import Distiller
from .fitnet import check_probe, log_published_probe, published_probe
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.EPS = 1e-5
_cfg.INIT_PRED_VAR = 5.0
_cfg.LEARN_VARIANCE = True  # False: the variance stays at INIT_PRED_VAR, as in mdistiller's code
# "published": mdistiller's probe forward (a random image through the student and the teacher in training mode: both
# models' BatchNorm running statistics move once) before the regressors are built; "clean": no probe
_cfg.PROBE = "clean"
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 1.0


def vid_regressor(in_channels, out_channels):
    """The mean predictor: three bias-free 1x1 convolutions with ReLUs between them."""
    def conv(i, o):
        return nn.Conv2d(i, o, kernel_size=1, bias=False)
    return nn.Sequential(conv(in_channels, out_channels), nn.ReLU(), conv(out_channels, out_channels), nn.ReLU(),
                         conv(out_channels, out_channels))


def initial_alpha(init_pred_var, eps):
    """alpha with log(1 + exp(alpha)) + eps == init_pred_var (the inverse softplus)."""
    return math.log(math.exp(init_pred_var - eps) - 1.0)


def gaussian_nll(pred_mean, alpha, target, eps=1e-5):
    """mean(0.5 * ((pred_mean - target)^2 / var + log var)), var = log(1 + exp(alpha)) + eps per channel."""
    var = (torch.log(1.0 + torch.exp(alpha)) + eps).view(1, -1, 1, 1).to(pred_mean)
    return torch.mean(0.5 * ((pred_mean - target) ** 2 / var + torch.log(var)))


@DISTILLER_REGISTRY.register("VID", config=_cfg)
class VID(Distiller):
    ramped_terms = ("vid",)

    def __init__(self, *, student, teacher, eps=1e-5, init_pred_var=5.0, learn_variance=True, ce_weight=1.0,
                 feat_weight=1.0, probe="clean", image_size=32):
        super().__init__(student=student, teacher=teacher)
        check_probe("VID", probe)
        if probe == "published":
            published_probe(student, self.teacher.model, image_size)
            log_published_probe("VID")
        self.eps, self.ce_weight, self.feat_weight = eps, ce_weight, feat_weight
        pairs = list(zip(student.stage_channels()[1:], self.teacher.stage_channels()[1:]))
        self.regressors = nn.ModuleList([vid_regressor(s, t) for s, t in pairs])
        start = initial_alpha(init_pred_var, eps)
        # frozen (requires_grad False) still travels with .to() and the checkpoint, but no optimizer sees it
        self.log_scales = nn.ParameterList([nn.Parameter(torch.full((t,), start), requires_grad=learn_variance)
                                            for _, t in pairs])

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.VID
        return {"eps": c.EPS, "init_pred_var": c.INIT_PRED_VAR, "learn_variance": c.LEARN_VARIANCE,
                "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT, "probe": c.PROBE,
                "image_size": data.image_size if data is not None else 32}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.VID
        if c.EPS < 0:
            raise ConfigError(f"config key VID.EPS: must be >= 0, got {c.EPS}")
        if c.INIT_PRED_VAR <= c.EPS:
            raise ConfigError(f"config key VID.INIT_PRED_VAR: must be > VID.EPS ({c.EPS}) so that the initial "
                              f"variance is reachable, got {c.INIT_PRED_VAR} (5.0 is the published setting)")
        check_probe("VID", c.PROBE)

    def vid_loss(self, feats_student, feats_teacher):
        """Sum over the stage pairs (stem dropped, shallowest first) of the Gaussian NLL of the teacher stage."""
        total = 0.0
        for i, (f_s, f_t) in enumerate(paired_stages(feats_student, feats_teacher)):
            f_s, f_t = matching_size(f_s, f_t)
            total = total + gaussian_nll(self.regressors[i](f_s), self.log_scales[i], f_t, self.eps)
        return total

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = self.vid_loss(features["feats"], features_t["feats"])
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "vid": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
