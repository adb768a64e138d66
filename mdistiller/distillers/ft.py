"""FT, factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network: Network Compression via Factor
Transfer"): a paraphraser, trained first to reconstruct the teacher's last feature map, compresses it into a
"factor"; a translator maps the student's last map to a factor of the same shape, and the student learns to match
the teacher's factor.

The tap is the last entry of features["feats"] in both networks (RepDistiller's feat[-2]: the last stage after its
ReLU for the ResNets, VGG and ShuffleNets, the last group's linear-bottleneck output for MobileNetV2, block3's raw
residual sum before the final BN-ReLU for WRN). Modules (RepDistiller models/util.py, PyTorch's default init):
  - Paraphraser(k = 0.5, no BN): encoder conv3x3(C_t -> C_t), conv3x3(C_t -> k C_t), conv3x3(k C_t -> k C_t), each
    followed by LeakyReLU(0.1); decoder three 3x3 transposed convs (stride 1, padding 1) back to C_t, each followed
    by LeakyReLU(0.1);
  - Translator(k = 0.5): conv3x3(C_s -> C_s), conv3x3(C_s -> k C_t), conv3x3(k C_t -> k C_t), each followed by
    BatchNorm and LeakyReLU(0.1).
factor(f) = L2-normalise over positions of mean over channels of f^2 (distiller_zoo/FT.py `factor`, p1 = 2); the
larger of the two factors is adaptive-average-pooled to the smaller size first; loss = mean over (n, position) of
|factor(translator(s)) - factor(paraphraser.encoder(t))| (p2 = 1). The paper (and the authors' code) normalises
the factor tensor itself, flattened over channels and positions; RepDistiller's channel mean of the square is an
attention map (AT's) of the factor, which we follow, as the CRD-table FT numbers come from it.

How the published code runs it (HobbitLong/RepDistiller, train_student.py `elif opt.distill == 'factor'`):
  - helper/pretrain.py `init`: for opt.init_epochs (30) epochs only the paraphraser trains, loss
    nn.MSELoss()(decoder(encoder(t)), t) (mean over every element), student and teacher in eval mode, a separate SGD
    (momentum 0.9, weight decay 5e-4) at a constant LR of 0.01 for the ResNet / WRN students (resnet8..resnet110,
    resnet8x4, resnet32x4, wrn_16_1/16_2/40_1/40_2), else opt.learning_rate (0.05 for vgg8; 0.01 for MobileNetV2 /
    ShuffleNet students);
  - then 240 epochs with a fresh SGD over the student and the translator: helper/loops.py `train_distill`,
    loss = CE + 200 * FT (the script's `-a 0 -b 200`: no KL term); the paraphraser is in eval mode and outside
    the optimizer (its encoder only makes the teacher's factor).

Here the two stages are one run: for epochs 1..FT.INIT_EPOCHS the step returns the reconstruction term "ft_rec"
alone, the student runs in eval mode under no_grad (its BatchNorm statistics untouched, no gradient, so the
optimizer skips it, weight decay included, and makes no momentum buffer for it: the main stage starts it as the
published fresh optimizer does), and `stage_lr` holds the LR at FT.INIT_LR. After it: CE_WEIGHT * CE +
FEAT_WEIGHT * FT, the paraphraser under no_grad (never stepped again). The configs that reproduce the published
recipe (configs/cifar100/ft/) set INIT_EPOCHS 30, SOLVER.EPOCHS 270 and the LR decay shifted by the 30 init epochs
(180, 210, 240), INIT_LR 0.05 for the vgg8 students. Where that differs from the published two runs: the student
is evaluated and checkpointed during the init epochs too (the untrained student: chance accuracy), and FT++'s dino
term, added to every step, only moves its own projector during the init (the student is frozen there).
INIT_EPOCHS 0 is a one-stage variant (an untrained paraphraser), which no published number uses.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .init_stage import InitStageDistiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
# epochs at the start of the run that train the paraphraser alone (the published initialisation stage: 30)
_cfg.INIT_EPOCHS = 30
# the constant LR of the init epochs: RepDistiller's 0.01 for the CIFAR ResNet / WRN students, the run's LR for the
# others (0.05 for vgg8, 0.01 for MobileNetV2 / ShuffleNet)
_cfg.INIT_LR = 0.01
_cfg.RATE = 0.5  # k: the factor has int(k * C_t) channels
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 200.0


def _leaky():
    return nn.LeakyReLU(0.1)


class Paraphraser(nn.Module):
    """RepDistiller's Paraphraser(t_shape, k, use_bn=False): three 3x3 convs down to the factor, three 3x3 transposed
    convs back, LeakyReLU(0.1) after each."""

    def __init__(self, channels, factor_channels):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _leaky(), nn.Conv2d(c, k, 3, 1, 1), _leaky(),
                                     nn.Conv2d(k, k, 3, 1, 1), _leaky())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(k, k, 3, 1, 1), _leaky(), nn.ConvTranspose2d(k, c, 3, 1, 1),
                                     _leaky(), nn.ConvTranspose2d(c, c, 3, 1, 1), _leaky())

    def forward(self, f):
        """The reconstruction of `f` (the encoder alone gives the factor)."""
        return self.decoder(self.encoder(f))


def translator(in_channels, factor_channels):
    """RepDistiller's Translator(s_shape, t_shape, k, use_bn=True): three 3x3 conv-BN-LeakyReLU(0.1)."""
    c, k = in_channels, factor_channels
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), _leaky(),
                         nn.Conv2d(c, k, 3, 1, 1), nn.BatchNorm2d(k), _leaky(),
                         nn.Conv2d(k, k, 3, 1, 1), nn.BatchNorm2d(k), _leaky())


def factor(f):
    """(N, H*W): the channel mean of f^2, L2-normalised per sample (RepDistiller's FactorTransfer.factor)."""
    return F.normalize(f.pow(2).mean(1).flatten(1))


def ft_loss(factor_s, factor_t):
    """mean |factor(s) - factor(t)|, the larger map adaptive-average-pooled to the smaller first (RepDistiller
    pools to a square of the smaller height; we pool height and width each to the smaller, the same on square
    maps)."""
    size = (min(factor_s.shape[-2], factor_t.shape[-2]), min(factor_s.shape[-1], factor_t.shape[-1]))
    if factor_s.shape[-2:] != size:
        factor_s = F.adaptive_avg_pool2d(factor_s, size)
    if factor_t.shape[-2:] != size:
        factor_t = F.adaptive_avg_pool2d(factor_t, size)
    return (factor(factor_s) - factor(factor_t)).abs().mean()


@contextlib.contextmanager
def frozen(module):
    """`module` in eval mode under no_grad (the published init's `model_s.eval()`, outside its optimizer)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


@DISTILLER_REGISTRY.register("FT", config=_cfg)
class FT(InitStageDistiller):
    init_section, init_stage = "FT", "paraphraser stage"
    init_stage_changes = "the loss terms and the trained modules change"
    ramped_terms = ("ft",)

    def __init__(self, *, student, teacher, init_epochs=30, init_lr=0.01, rate=0.5, ce_weight=1.0,
                 feat_weight=200.0):
        super().__init__(student=student, teacher=teacher)
        c_s, c_t = student.stage_channels()[-1], self.teacher.stage_channels()[-1]
        k = int(c_t * rate)
        if k < 1:
            raise ConfigError(f"config key FT.RATE: {rate} x the teacher's {c_t} channels leaves no factor channel; "
                              f"use the published 0.5")
        self.paraphraser = Paraphraser(c_t, k)
        self.translator = translator(c_s, k)
        self.init_epochs, self.init_lr = init_epochs, init_lr
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.FT
        return {"init_epochs": c.INIT_EPOCHS, "init_lr": c.INIT_LR, "rate": c.RATE,
                "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.FT
        cls.validate_init_epochs(cfg)
        if c.INIT_LR <= 0:
            raise ConfigError(f"config key FT.INIT_LR: must be > 0, got {c.INIT_LR} (published: 0.01 for the CIFAR "
                              f"ResNet / WRN students, else the run's SOLVER.LR)")
        if not 0 < c.RATE <= 1:
            raise ConfigError(f"config key FT.RATE: must lie in (0, 1], got {c.RATE} (published: 0.5)")
        if c.LOSS.CE_WEIGHT < 0:
            raise ConfigError(f"config key FT.LOSS.CE_WEIGHT: must be >= 0, got {c.LOSS.CE_WEIGHT}")
        if c.LOSS.FEAT_WEIGHT <= 0:
            raise ConfigError(f"config key FT.LOSS.FEAT_WEIGHT: must be > 0, got {c.LOSS.FEAT_WEIGHT} (0 trains the "
                              f"student on the CE alone; published: 200)")

    def stage_lr(self, epoch):
        return self.init_lr if self.in_init_stage(epoch) else None

    def forward_train(self, images, labels, epoch, index=None):
        logits_t, features_t = self.teacher(images)
        f_t = features_t["feats"][-1]
        if self.in_init_stage(epoch):
            with frozen(self.student):  # the published init trains the paraphraser alone
                logits, features = self.student(images)
            terms = {"ft_rec": distill_loss(F.mse_loss(self.paraphraser(f_t), f_t))}
        else:
            logits, features = self.student(images)
            with torch.no_grad():  # the paraphraser is out of the published main stage's optimizer
                factor_t = self.paraphraser.encoder(f_t)
            factor_s = self.translator(features["feats"][-1])
            terms = {"ce": ce_term(logits, labels, self.ce_weight),
                     "ft": distill_loss(self.feat_weight * ft_loss(factor_s, factor_t))}
        return StepOutput(logits, terms, features, logits_t, features_t)
