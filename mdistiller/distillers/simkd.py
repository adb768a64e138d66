"""SimKD, "Knowledge Distillation with the Reused Teacher Classifier" (Chen et al., CVPR 2022): the student's last
feature map goes through a projector to the teacher's width and is trained, by one MSE loss, to equal the teacher's
last feature map; the student then *classifies with the teacher's classifier* (frozen) on the pooled projected map.

As the authors' code computes it (DefangChen/SimKD; models/util.py class SimKD, helper/loops.py train_distill and
validate_distill, train_student.py, scripts/run_distill.sh):
  - taps: the student's and the teacher's last stage output, the map before global pooling (their `feat[-2]`): here
    each model's map its classifier pools when that map is one of its taps (features["feats"][-1]; for the
    pre-activation WRNs relu(features["preact_feats"][-1])), else, for a student, its last stage output
    features["feats"][-1] (MobileNetV2, ShuffleV2: before their head conv, exactly the published `feat[-2]`). The
    teacher's map must be the one its classifier pools (else the reused classifier would not fit it);
  - spatial alignment: the larger map is adaptive-average-pooled to the smaller one's size (the published code
    pools to a square of the smaller height; we pool height and width separately, the same for square maps);
  - projector (`transfer`): conv1x1(C_s, C_t/f) - BN - ReLU - conv3x3(C_t/f, C_t/f, padding 1) - BN - ReLU -
    conv1x1(C_t/f, C_t) - BN - ReLU, every conv without bias, f = FACTOR (2 in every published run; the
    depthwise 3x3 variant is commented out in the published code), C_t the teacher classifier's input width;
  - loss: FEAT_WEIGHT * MSE(projected student map, aligned teacher map), FEAT_WEIGHT 1 (`-b 1`); the CE and KD
    terms have weight 0 (`-c 0 -d 0`), so SimKD trains with the feature loss alone. CE_WEIGHT > 0 adds the CE
    the published code would add: on the student's *own* logits (its loss_cls is computed before `logit_s` is
    replaced by the teacher-classifier prediction), which trains the student's own classifier only;
  - prediction (training accuracy and evaluation): the teacher's classifier (weights and bias, frozen) on the
    spatial mean of the projected map. `forward` (what the run's evaluation and best.pth selection use) does this.

The teacher's classifier is copied into persistent buffers (`classifier_weight`, `classifier_bias`): they are not
trained, and the method's checkpoint state (best.pth / latest.pth "distiller") holds everything SimKD's inference
needs - the student, the projector and the classifier - without the teacher. With CE_WEIGHT 0 the student's own
classifier is unused, and it is frozen (requires_grad False) so that no optimizer or DDP reducer waits for it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .classifier_head import classifier_linear
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.FACTOR = 2  # projector bottleneck: C_t / FACTOR channels (train_student.py --factor, default 2)
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 0.0  # -c 0 in every published SimKD run; > 0: CE on the student's own logits
_cfg.LOSS.FEAT_WEIGHT = 1.0  # -b 1

# the taps a model's pooled map may be, by name: how to read each from the model's features
TAPS = {
    "feats": lambda f: f["feats"][-1],
    "relu_preact": lambda f: F.relu(f["preact_feats"][-1]),
}


def probe_features(model, image_size):
    """features of one fixed random image (its own generator: the global one is not drawn from), model in eval
    mode (no BatchNorm statistic moves), under no_grad; the model is returned to its mode."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, feats = model(x.to(device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return feats


def pooled_tap(features):
    """The name in TAPS of the map whose spatial mean is features["pooled_feat"] (the classifier's input), or
    None when no tap is that map (MobileNetV2, ShuffleV2: their head conv follows the last stage)."""
    pooled = features["pooled_feat"].float()
    for name, read in TAPS.items():
        try:
            m = read(features)
        except (KeyError, IndexError):
            continue
        if m.dim() == 4 and m.shape[1] == pooled.shape[1] and torch.allclose(
                m.float().mean(dim=(2, 3)), pooled, rtol=1e-4, atol=1e-5):
            return name
    return None


def simkd_projector(s_channels, t_channels, factor):
    """The published `transfer`: 1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN -> ReLU, convs bias-free."""
    mid = t_channels // factor
    return nn.Sequential(
        nn.Conv2d(s_channels, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, t_channels, kernel_size=1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU())


def align(feat_s, size_t):
    """(source, target size): the student map pooled to the teacher's size when larger; else the student map
    and the student's size (the teacher map is then pooled to it)."""
    s_h, s_w = feat_s.shape[-2:]
    t_h, t_w = size_t
    if s_h > t_h:
        return F.adaptive_avg_pool2d(feat_s, (t_h, t_w)), (t_h, t_w)
    return feat_s, (s_h, s_w)


@DISTILLER_REGISTRY.register("SIMKD", config=_cfg)
class SimKD(Distiller):
    ramped_terms = ("simkd",)
    evaluates_student_alone = False  # predictions: projector, then the teacher's classifier

    def __init__(self, *, student, teacher, factor=2, ce_weight=0.0, feat_weight=1.0, image_size=32):
        super().__init__(student=student, teacher=teacher)
        if factor < 1:
            raise ConfigError(f"config key SIMKD.FACTOR: must be >= 1, got {factor} (2 is the published setting)")
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        feats_s = probe_features(student, image_size)
        feats_t = probe_features(self.teacher.model, image_size)
        self.tap_s = pooled_tap(feats_s) or "feats"
        self.tap_t = pooled_tap(feats_t)
        if self.tap_t is None:
            raise ConfigError(f"config key DISTILLER.TEACHER: SIMKD reuses the teacher's classifier on its last map, "
                              f"but {type(self.teacher.model).__name__}'s classifier reads no map that is one of "
                              "its feature taps (a head conv follows its last stage, or it reads a token rather "
                              "than a pooled map); use a teacher whose classifier pools its last stage (ResNet, "
                              "WRN, VGG, ShuffleV1)")
        map_s, map_t = TAPS[self.tap_s](feats_s), TAPS[self.tap_t](feats_t)
        t_channels = self.teacher.feat_dim
        if t_channels // factor < 1:
            raise ConfigError(f"config key SIMKD.FACTOR: {factor} leaves no channel in the projector's bottleneck "
                              f"(teacher width {t_channels}); use at most {t_channels}")
        self.projector = simkd_projector(map_s.shape[1], t_channels, factor)
        # map sizes at the dataset's image size: evaluation aligns without running the teacher
        self.probe_size_s, self.probe_size_t = tuple(map_s.shape[-2:]), tuple(map_t.shape[-2:])
        fc = classifier_linear(self.teacher.model, "SIMKD")
        self.register_buffer("classifier_weight", fc.weight.detach().float().clone())
        bias = torch.zeros(fc.out_features) if fc.bias is None else fc.bias.detach().float().clone()
        self.register_buffer("classifier_bias", bias)
        if ce_weight == 0:
            try:
                own = classifier_linear(student, "SIMKD", "STUDENT")
            except ConfigError:
                own = None
            if own is not None:
                own.requires_grad_(False)  # unused: no loss reaches it

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.SIMKD
        return {"factor": c.FACTOR, "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT,
                "image_size": data.image_size if data is not None else 32}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.SIMKD
        if c.FACTOR < 1:
            raise ConfigError(f"config key SIMKD.FACTOR: must be >= 1, got {c.FACTOR} (2 is the published setting)")
        if c.LOSS.CE_WEIGHT < 0:
            raise ConfigError(f"config key SIMKD.LOSS.CE_WEIGHT: must be >= 0, got {c.LOSS.CE_WEIGHT} (0 is the "
                              "published setting: SimKD trains with the feature loss alone)")
        if c.LOSS.FEAT_WEIGHT <= 0:
            raise ConfigError(f"config key SIMKD.LOSS.FEAT_WEIGHT: must be > 0 (SimKD's only distillation term), got "
                              f"{c.LOSS.FEAT_WEIGHT} (1 is the published setting)")

    def student_map(self, features):
        return TAPS[self.tap_s](features)

    def teacher_map(self, features_t):
        return TAPS[self.tap_t](features_t)

    def classify(self, projected):
        """The teacher's classifier on the spatial mean of the projected map."""
        pooled = projected.mean(dim=(2, 3))
        return F.linear(pooled, self.classifier_weight.to(pooled.dtype), self.classifier_bias.to(pooled.dtype))

    def project(self, feat_s, size_t):
        """(projected student map, the size the teacher map is pooled to)."""
        source, size = align(feat_s, size_t)
        return self.projector(source), size

    def forward_train(self, images, labels, epoch, index=None):
        logits_s, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        map_t = self.teacher_map(features_t)
        projected, size = self.project(self.student_map(features), map_t.shape[-2:])
        target = map_t if tuple(map_t.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(map_t, size)
        terms = {}
        if self.ce_weight > 0:
            terms["ce"] = ce_term(logits_s, labels, self.ce_weight)
        terms["simkd"] = distill_loss(self.feat_weight * F.mse_loss(projected, target.detach()))
        return StepOutput(self.classify(projected), terms, features, logits_t, features_t)

    def evaluation_modules(self):
        return [self.student, self.projector]

    def forward(self, images):
        """Evaluation: the teacher's classifier on the pooled projected student map (as validate_distill)."""
        _, features = self.student(images)
        feat_s = self.student_map(features)
        if tuple(feat_s.shape[-2:]) == self.probe_size_s:
            size_t = self.probe_size_t
        else:  # another input size than the probe's: the teacher's map size at this size
            size_t = self.teacher_map(self.teacher(images)[1]).shape[-2:]
        return self.classify(self.project(feat_s, size_t)[0])
