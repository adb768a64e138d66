"""FSP, flow of solution procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation"): the student
learns how the teacher's features change from one stage to the next, as the Gram matrix between consecutive
feature maps.

For two consecutive entries of features["feats"] (stem first, then every stage; post-ReLU for the ResNets and VGG,
the raw residual sums for WRN, as the published taps), bottom b (C_b channels) and top a (C_a channels):
G[n, i, j] = mean over positions p of a[n, i, p] * b[n, j, p] (a C_a x C_b matrix per sample); where the two maps
differ in size, the larger one is adaptive-average-pooled to the smaller. loss = sum over consecutive pairs of
mean over (n, i, j) of (G_s - G_t)^2. The matrices are compared entry by entry, so every student map must have the
teacher's channel count (the spatial sizes may differ): pairs such as wrn_40_2 -> wrn_40_1 or any cross-architecture
pair are refused, as the published code refuses them (and the CRD tables list FSP as N/A there).

How the published code (HobbitLong/RepDistiller, the runs behind the CRD tables) uses it - as an *initialisation
stage*, not as a loss beside the cross-entropy:
  - train_student.py, `elif opt.distill == 'fsp'`: FSP(s_shapes, t_shapes) on feat[:-1] (all maps but the pooled
    vector), then `init(model_s, model_t, [model_s.get_feat_modules()], criterion_kd, ...)`;
  - helper/pretrain.py `init`: for opt.init_epochs (30) epochs, loss = sum of the FSP pair losses, *unweighted*, no
    cross-entropy; a separate SGD over the student's feature modules only (the classifier is not updated), LR
    opt.learning_rate (0.05; 0.01 for MobileNetV2/ShuffleNet students) held constant, momentum 0.9, weight decay
    5e-4; the student's feature modules in training mode, the teacher in eval mode;
  - then the normal 240-epoch run with a fresh SGD: helper/loops.py `train_distill` sets `loss_kd = 0` for fsp, so
    loss = gamma * CE + alpha * KL + beta * 0 = CE alone (the script's `-a 0 -b 50`: beta 50 multiplies zero).

Here the two stages are one run: for epochs 1..FSP.INIT_EPOCHS the step returns the FSP term alone (unweighted, as
published: only the student's feature layers receive gradients, so the classifier is untouched - torch's SGD and the
DOT optimizer skip a parameter without a gradient, weight decay included); after it, CE_WEIGHT * CE plus
FEAT_WEIGHT * FSP when FEAT_WEIGHT > 0 (the term is left out at 0, the published main stage). The configs that
reproduce the published recipe (configs/cifar100/fsp/) set INIT_EPOCHS 30, FEAT_WEIGHT 0, SOLVER.EPOCHS 270 and the
LR decay shifted by the 30 init epochs (180, 210, 240), so the init epochs run at the constant base LR as published.
Where that differs from the published two runs: the momentum buffers of the feature layers carry over from the init
into the main stage (published: a fresh optimizer), the student is evaluated and checkpointed during the init epochs
too, and a WRN student's final BN (not a feature module there, so in eval mode during the published init) moves its
running statistics during our init epochs (it is off the FSP path; the main stage overwrites them).

The section's defaults are the published recipe (INIT_EPOCHS 30, FEAT_WEIGHT 0), so SOLVER.EPOCHS must leave
classification epochs after the stage. INIT_EPOCHS 0 with FEAT_WEIGHT > 0 is a one-stage variant, FSP beside the
CE, which no published number uses (the published script's unused beta is 50; on a 1-epoch Fashion-MNIST run that
weight diverged, tests/test_train_every_method.py runs it at 1).
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .init_stage import InitStageDistiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
# epochs at the start of the run that train the student's feature layers with the FSP loss alone (the published
# initialisation stage: 30); 0: no such stage
_cfg.INIT_EPOCHS = 30
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
# weight of the FSP term beside the CE after the init stage; the published main stage has none (0; the published
# script passes -b 50, unused there)
_cfg.LOSS.FEAT_WEIGHT = 0.0


def same_size(bottom, top):
    """Both maps pooled to the smaller height and width of the two, where they differ (the published code pools
    the larger to a square of the smaller height; the same for square maps)."""
    size = (min(bottom.shape[-2], top.shape[-2]), min(bottom.shape[-1], top.shape[-1]))
    if bottom.shape[-2:] != size:
        bottom = F.adaptive_avg_pool2d(bottom, size)
    if top.shape[-2:] != size:
        top = F.adaptive_avg_pool2d(top, size)
    return bottom, top


def fsp_matrix(bottom, top):
    """(N, C_top, C_bottom): entry (i, j) the mean over positions of top channel i times bottom channel j."""
    bottom, top = same_size(bottom, top)
    b, a = bottom.flatten(2), top.flatten(2)
    return a @ b.transpose(1, 2) / b.shape[-1]


def fsp_matrices(feats):
    """The FSP matrix of every pair of consecutive maps."""
    return [fsp_matrix(feats[i], feats[i + 1]) for i in range(len(feats) - 1)]


def fsp_loss(feats_student, feats_teacher):
    """Sum over consecutive-map pairs of the mean squared difference of the FSP matrices."""
    total = 0.0
    for g_s, g_t in zip(fsp_matrices(feats_student), fsp_matrices(feats_teacher)):
        total = total + (g_s - g_t).pow(2).mean()
    return total


def check_channels(student_channels, teacher_channels):
    if list(student_channels) != list(teacher_channels):
        raise ConfigError(
            f"config keys DISTILLER.STUDENT / DISTILLER.TEACHER: FSP compares the Gram matrices of consecutive maps "
            f"entry by entry, so every map (stem and stages) needs the same channel count in both networks; the "
            f"student has {list(student_channels)}, the teacher {list(teacher_channels)} (the published code refuses "
            f"such a pair too); choose a pair of the same family and widths, e.g. resnet56 -> resnet20")


@DISTILLER_REGISTRY.register("FSP", config=_cfg)
class FSP(InitStageDistiller):
    init_section = "FSP"
    ramped_terms = ("fsp",)

    def __init__(self, *, student, teacher, init_epochs=30, ce_weight=1.0, feat_weight=0.0):
        super().__init__(student=student, teacher=teacher)
        check_channels(student.stage_channels(), self.teacher.stage_channels())
        self.init_epochs, self.ce_weight, self.feat_weight = init_epochs, ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.FSP
        return {"init_epochs": c.INIT_EPOCHS, "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.FSP
        cls.validate_init_epochs(cfg)
        for key, value in (("LOSS.CE_WEIGHT", c.LOSS.CE_WEIGHT), ("LOSS.FEAT_WEIGHT", c.LOSS.FEAT_WEIGHT)):
            if value < 0:
                raise ConfigError(f"config key FSP.{key}: must be >= 0, got {value}")
        if c.INIT_EPOCHS == 0 and c.LOSS.FEAT_WEIGHT == 0:
            raise ConfigError("config key FSP.LOSS.FEAT_WEIGHT: 0 with FSP.INIT_EPOCHS 0 trains with the CE alone (no "
                              "FSP anywhere); set FSP.INIT_EPOCHS 30 (the published initialisation stage) or a "
                              "positive FEAT_WEIGHT")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        if self.in_init_stage(epoch):
            # the published init stage: the FSP sum alone, unweighted
            terms = {"fsp": distill_loss(fsp_loss(features["feats"], features_t["feats"]))}
        else:
            terms = {"ce": ce_term(logits, labels, self.ce_weight)}
            if self.feat_weight > 0:
                terms["fsp"] = distill_loss(self.feat_weight * fsp_loss(features["feats"], features_t["feats"]))
        return StepOutput(logits, terms, features, logits_t, features_t)
