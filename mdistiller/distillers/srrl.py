"""SRRL, "Knowledge Distillation via Softmax Regression Representation Learning" (Yang et al., ICLR 2021): make
the student's penultimate representation good enough that the *teacher's* classifier works on it.

The student's last feature map goes through a connector (1x1 conv + BN + ReLU, to the teacher's width), then two
losses pull it towards the teacher:
  - feature matching: mean squared difference of the channel means (the global-average-pooled connected map)
    and the teacher's pooled feature;
  - softmax regression: the teacher's own classifier (frozen) applied to that pooled vector, its logits
    regressed onto the teacher's logits by mean squared error; its gradient reaches the student through the
    teacher's classifier.
loss = CE_WEIGHT * CE + FM_WEIGHT * feature matching + SR_WEIGHT * softmax regression.

The authors' code (jingyang2017/KD_SRRL, train_imagenet_distillation.py and distiller_zoo/AIN.py) is the
reference: connector conv init N(0, 2 / out_channels), BN 1/0, ReLU; the feature loss `statm_loss` compares
per-channel spatial means (squared difference, mean over channels and batch), which is exactly the MSE of the
pooled vectors used here; the classifier loss is F.mse_loss(teacher_fc(avgpool(connected)), teacher_logits);
loss = CE + 1 * (both), hence the defaults 1 / 1 / 1 (KD++ table 2 quotes SRRL's ImageNet results, which the
authors ran this way). Choices the published code leaves open:
  - which student map: the authors' ResNets and MobileNetV1 hand over the last stage output, the map right
    before pooling; we take the student's last features["feats"] entry for every model, which for students
    with a head conv after the last stage (MobileNetV2, ShuffleV2) is the map before that conv;
  - the teacher's target is its features["pooled_feat"] (its classifier's input): for the authors' ResNets the
    same as the spatial mean of its last map;
  - the committed `statm_loss(feat_s, feat_t)` call constructs the loss module rather than applying it (it
    cannot run as written); we apply the loss, as the surrounding code intends.
The teacher's classifier is its final nn.Linear (attribute fc, linear or classifier), copied as frozen float32
buffers, so a teacher run in half precision or int8 (SPEED) still gives an exact float32 head.
"""

import math

import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from .base import Distiller
from .classifier_head import classifier_linear
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FM_WEIGHT = 1.0
_cfg.LOSS.SR_WEIGHT = 1.0

def teacher_linear(model):
    """The teacher's classifier, which SRRL applies to the student's connected feature."""
    return classifier_linear(model, "SRRL")


def connector(s_channels, t_channels):
    """1x1 conv (no bias) + BN + ReLU; conv init N(0, 2 / out_channels), as the authors'."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels), nn.ReLU())


@DISTILLER_REGISTRY.register("SRRL", config=_cfg)
class SRRL(Distiller):
    ramped_terms = ("fm", "sr")

    def __init__(self, *, student, teacher, ce_weight=1.0, fm_weight=1.0, sr_weight=1.0):
        super().__init__(student=student, teacher=teacher)
        self.ce_weight, self.fm_weight, self.sr_weight = ce_weight, fm_weight, sr_weight
        self.connector = connector(student.stage_channels()[-1], self.teacher.feat_dim)
        fc = teacher_linear(self.teacher.model)
        # The teacher's classifier, frozen: buffers are not trained and not checkpointed (rebuilt from the teacher).
        self.register_buffer("teacher_fc_weight", fc.weight.detach().float().clone(), persistent=False)
        bias = None if fc.bias is None else fc.bias.detach().float().clone()
        self.register_buffer("teacher_fc_bias", bias, persistent=False)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.SRRL.LOSS
        return {"ce_weight": c.CE_WEIGHT, "fm_weight": c.FM_WEIGHT, "sr_weight": c.SR_WEIGHT}

    def srrl_losses(self, feat_student, pooled_teacher, logits_teacher):
        """(feature matching, softmax regression) from the student's last map and the teacher's outputs."""
        pooled = self.connector(feat_student).mean(dim=(2, 3))
        fm = F.mse_loss(pooled, pooled_teacher)
        sr = F.mse_loss(F.linear(pooled, self.teacher_fc_weight, self.teacher_fc_bias), logits_teacher)
        return fm, sr

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        fm, sr = self.srrl_losses(features["feats"][-1], features_t["pooled_feat"], logits_t)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "fm": distill_loss(self.fm_weight * fm),
            "sr": distill_loss(self.sr_weight * sr),
        }, features, logits_t, features_t)
