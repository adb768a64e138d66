"""CAT-KD, "Class Attention Transfer Based Knowledge Distillation" (Guo et al., CVPR 2023): transfer the teacher's
class activation maps (CAMs) - its classifier applied as a 1x1 convolution to the map it pools - to the student's,
after average pooling both to a small size.

As the authors' code computes it (GzyAftermath/CAT-KD, built on mdistiller: mdistiller/distillers/CAT_KD.py,
mdistiller/engine/cfg.py, tools/train.py "if_test", mdistiller/models/cifar/*_test models, configs/cifar100/CAT_KD):
  - CAMs: the classifier weight W (classes x C) as a bias-free 1x1 conv on the map the classifier pools (the
    post-ReLU last stage of the ResNets/VGG/ShuffleV1, relu(bn1(block3)) of the WRNs, the head conv's output of
    MobileNetV2/ShuffleV2). The teacher's CAMs use its trained classifier weight (tools/train.py copies fc.weight
    into `conv_test`; the bias is dropped). The student's classifier *is* such a conv (`conv_test`, no bias) and its
    logits are the spatial mean of its CAMs; here the student's own Linear classifier plays that role: its CAMs are
    conv1x1(map, W_s), and its bias is zeroed and frozen (CATKD.STUDENT_BIAS False), so that its logits,
    W_s GAP(map), are exactly the published student's. The published conv's init is kept (CATKD.HEAD_INIT):
    he_normal = N(0, 2 / classes), the ResNet/WRN/VGG/MobileNetV2 models' conv init loops; default = torch's conv
    default, the ShuffleNets' (no init loop), which has the distribution of a Linear layer's default weight init;
  - loss = CAT_WEIGHT * MSE(n(pool(CAM_s)), n(pool(CAM_t))), pool = adaptive average pooling to CAM_RESOLUTION x
    CAM_RESOLUTION, n = L2 normalisation of each CAM over its positions when NORMALIZE (F.normalize(dim=(2, 3)),
    eps 1e-12), else the identity; the MSE is the mean over batch, classes and positions;
  - CE_WEIGHT * CE on the student's logits beside it (CAT-KD); ONLY_CAT drops the CE ("CAT", onlyCAT True);
  - BINARIZE (the paper's binarised-CAM ablation): each teacher CAM replaced by 1 where it exceeds its mean
    absolute value (its L1 norm / positions), else 0;
  - no warm-up: the published trainer and CAT_KD.forward_train never read the epoch, so the term has full weight
    from the first step;
  - per-pair settings (configs/cifar100/CAT_KD/*.yaml): CAT weight, CAM resolution 2 or 4, NORMALIZE; defaults
    here are engine/cfg.py's (CAT weight 400, resolution 2, normalise True, CE 1).
Not implemented: the "transfer only some classes' CAMs" ablation (IF_OnlyTransferPartialCAMs, CAMs_Nums, Strategy),
which no CAT-KD table result uses.

Which map: the teacher's is read from its features (features["feats"][-1] or, for the WRNs,
relu(features["preact_feats"][-1]), whichever is the map its classifier pools, found by one probe image at build),
so it works for any teacher speed path (half precision, int8). A student whose pooled map is not among its taps
(MobileNetV2, ShuffleV2: a head conv follows the last stage) has it read by a forward pre-hook on its `avgpool`
module, the module that pools it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY
from .classifier_head import classifier_linear
from .simkd import TAPS, pooled_tap, probe_features

HEAD_INITS = ("he_normal", "default", "model")

_cfg = CN()
_cfg.CAM_RESOLUTION = 2  # CAT_KD.LOSS.CAM_RESOLUTION
_cfg.NORMALIZE = True  # CAT_KD.IF_NORMALIZE
_cfg.ONLY_CAT = False  # CAT_KD.onlyCAT: True drops the CE ("CAT" of the paper)
_cfg.BINARIZE = False  # CAT_KD.IF_BINARIZE (ablation)
_cfg.STUDENT_BIAS = False  # the published student's classifier is a bias-free conv: its bias zeroed and frozen
# init of the student's classifier weight: he_normal N(0, 2/classes) (conv_test in the ResNet/WRN/VGG/MobileNetV2
# init loops), default (torch's default conv init: the ShuffleNets'), model (leave the zoo model's init)
_cfg.HEAD_INIT = "he_normal"
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.CAT_WEIGHT = 400.0  # CAT_KD.LOSS.CAT_loss_weight (beta); every CIFAR pair sets its own


def class_activation_maps(feature_map, weight):
    """(N, classes, H, W): the classifier weight (classes x C) as a bias-free 1x1 conv on the (N, C, H, W) map."""
    return F.conv2d(feature_map, weight.to(feature_map.dtype)[:, :, None, None])


def binarize(cams):
    """1 where a CAM exceeds its mean absolute value over its positions, else 0 (IF_BINARIZE)."""
    h, w = cams.shape[-2:]
    threshold = cams.abs().sum(dim=(2, 3), keepdim=True) / (h * w)
    return (cams > threshold).to(cams.dtype)


def cat_loss(cams_s, cams_t, resolution, normalize):
    """MSE of the CAMs average-pooled to resolution x resolution, each L2-normalised over positions if asked."""
    s = F.adaptive_avg_pool2d(cams_s, (resolution, resolution))
    t = F.adaptive_avg_pool2d(cams_t, (resolution, resolution))
    if normalize:
        s, t = F.normalize(s, dim=(2, 3)), F.normalize(t, dim=(2, 3))
    return F.mse_loss(s, t)


class PoolInput:
    """A forward pre-hook keeping the input of the module it is registered on (the map a model's avgpool pools)."""

    def __init__(self):
        self.value = None

    def __call__(self, module, args):
        self.value = args[0]


@DISTILLER_REGISTRY.register("CATKD", config=_cfg)
class CATKD(Distiller):
    ramped_terms = ("cat",)

    def __init__(self, *, student, teacher, cam_resolution=2, normalize=True, only_cat=False, binarize=False,
                 student_bias=False, head_init="he_normal", ce_weight=1.0, cat_weight=400.0, image_size=32):
        super().__init__(student=student, teacher=teacher)
        if head_init not in HEAD_INITS:
            raise ConfigError(f"config key CATKD.HEAD_INIT: one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        self.cam_resolution, self.normalize, self.only_cat = cam_resolution, normalize, only_cat
        self.binarize, self.ce_weight, self.cat_weight = binarize, ce_weight, cat_weight
        self.tap_t = pooled_tap(probe_features(self.teacher.model, image_size))
        if self.tap_t is None:
            raise ConfigError(f"config key DISTILLER.TEACHER: CATKD computes the teacher's CAMs on the map its "
                              f"classifier pools, and {type(self.teacher.model).__name__}'s is not one of its "
                              "feature taps (a head conv follows its last stage, or its classifier reads a token "
                              "rather than a pooled map); use a ResNet, WRN, VGG or ShuffleV1 teacher")
        fc_t = classifier_linear(self.teacher.model, "CATKD")
        # the teacher's classifier weight, frozen (not trained, not checkpointed: rebuilt from the teacher)
        self.register_buffer("teacher_weight", fc_t.weight.detach().float().clone(), persistent=False)
        self.head = classifier_linear(student, "CATKD", "STUDENT")
        self._init_head(head_init, student_bias)
        self.tap_s = pooled_tap(probe_features(student, image_size))
        self._pool_input = None
        if self.tap_s is None:  # read the pooled map where it is pooled
            pool = getattr(student, "avgpool", None)
            if not isinstance(pool, nn.Module):
                raise ConfigError(f"config key DISTILLER.STUDENT: CATKD needs the map {type(student).__name__}'s "
                                  "classifier pools, which is neither a feature tap nor the input of an `avgpool` "
                                  "module; use a zoo student")
            self._pool_input = PoolInput()
            pool.register_forward_pre_hook(self._pool_input)

    def _init_head(self, head_init, student_bias):
        head = self.head
        if head_init == "he_normal":
            nn.init.normal_(head.weight, 0.0, math.sqrt(2.0 / head.out_features))
        elif head_init == "default":  # torch's Conv2d/Linear weight default: kaiming_uniform_(a=sqrt(5))
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5))
        if head.bias is not None and not student_bias:
            with torch.no_grad():
                head.bias.zero_()
            head.bias.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.CATKD
        return {"cam_resolution": c.CAM_RESOLUTION, "normalize": c.NORMALIZE, "only_cat": c.ONLY_CAT,
                "binarize": c.BINARIZE, "student_bias": c.STUDENT_BIAS, "head_init": c.HEAD_INIT,
                "ce_weight": c.LOSS.CE_WEIGHT, "cat_weight": c.LOSS.CAT_WEIGHT,
                "image_size": data.image_size if data is not None else 32}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.CATKD
        if c.CAM_RESOLUTION < 1:
            raise ConfigError(f"config key CATKD.CAM_RESOLUTION: must be >= 1 (positions per side of the pooled "
                              f"CAMs), got {c.CAM_RESOLUTION} (the published CIFAR settings are 2 and 4)")
        if c.LOSS.CAT_WEIGHT <= 0:
            raise ConfigError(f"config key CATKD.LOSS.CAT_WEIGHT: must be > 0 (CAT-KD's distillation term), got "
                              f"{c.LOSS.CAT_WEIGHT}")
        if c.LOSS.CE_WEIGHT < 0:
            raise ConfigError(f"config key CATKD.LOSS.CE_WEIGHT: must be >= 0, got {c.LOSS.CE_WEIGHT}")
        if c.ONLY_CAT and c.LOSS.CE_WEIGHT != 1.0:
            raise ConfigError("config key CATKD.ONLY_CAT: True drops the CE, so CATKD.LOSS.CE_WEIGHT has no effect; "
                              "leave it at 1.0 or set ONLY_CAT False")
        if c.HEAD_INIT not in HEAD_INITS:
            raise ConfigError(f"config key CATKD.HEAD_INIT: one of {', '.join(HEAD_INITS)}, got {c.HEAD_INIT!r}")

    def student_map(self, features):
        if self._pool_input is None:
            return TAPS[self.tap_s](features)
        value, self._pool_input.value = self._pool_input.value, None
        if value is None:
            raise RuntimeError("CATKD: the student's avgpool hook saw no input in this forward")
        return value

    def cams(self, features, features_t):
        """(student CAMs, teacher CAMs) of one forward."""
        cams_s = class_activation_maps(self.student_map(features), self.head.weight)
        cams_t = class_activation_maps(TAPS[self.tap_t](features_t).detach(), self.teacher_weight)
        if self.binarize:
            cams_t = binarize(cams_t)
        return cams_s, cams_t

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        cams_s, cams_t = self.cams(features, features_t)
        terms = {}
        if not self.only_cat:
            terms["ce"] = ce_term(logits, labels, self.ce_weight)
        terms["cat"] = distill_loss(self.cat_weight * cat_loss(cams_s, cams_t, self.cam_resolution, self.normalize))
        return StepOutput(logits, terms, features, logits_t, features_t)

    def forward(self, images):
        """Evaluation: the student alone (its logits are the mean of its CAMs); the hook's map is dropped."""
        logits = self.student(images)[0]
        if self._pool_input is not None:
            self._pool_input.value = None
        return logits
