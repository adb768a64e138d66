"""The "++" of KD++ (Wang et al., "Improving Knowledge Distillation via Regularizing Feature Direction and
Norm"): the dino term, added to any teacher-based method X as DISTILLER.TYPE "X++".

The term pulls the student's penultimate feature f_s towards the direction of the teacher's class mean e_k, with a
norm at least the teacher's: 1 - f_s.e_k / max(|f_s|, |f_t|) (eq. 5-7), weighted by DINO.WEIGHT (beta of eq. 8)
beside X's own losses. The builder adds a `DinoTerm` to X (`Distiller.add_term`) and the term reads the features of
X's own forward from its StepOutput, so X needs no edit and nothing runs twice. The class means are handed to
the term before the first step (`set_class_means`: the builder's cached teacher pass, engine/class_means.py) and live
in buffers, so checkpoints carry them. Projector,
Linear re-initialisation and the equations in full: docs/methods.md, "The ++ variants".
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .losses import distill_loss
from .term_registry import TERM_REGISTRY

_cfg = CN()
# beta of eq. 8. KD++ repository, CIFAR (CE/KD/dino): res56-res20 1/1/2, res32x4-res8x4 1/3.5/2, wrn40_2-wrn40_1
# 1/1/1.5, res50-mv2 1/3/0.5, res32x4-shuv1 1/2.5/1.5, res32x4-shuv2 1/4/0.5 (the CE/KD weights are X's keys).
_cfg.WEIGHT = 2.0
# When student and teacher feature sizes differ: bn_dropout_linear (the authors' code: BatchNorm1d -> Dropout(0.5) ->
# Linear), linear_bn (the paper's text: Linear -> BatchNorm1d) or linear.
_cfg.PROJECTOR = "bn_dropout_linear"
# How the Linear layers of the student and the projector are (re-)initialised, as the authors' student wrapper does:
# default (each module's own init), zero_bias (KD++ CIFAR code: every bias 0) or normal (KD++ ImageNet code: every
# weight and bias ~ N(0, 0.01)). BatchNorm1d of the projector: weight 1, bias 0 in all cases.
_cfg.LINEAR_INIT = "default"
# Teacher class means over the training set (class_means.py): as the authors computed them, from *augmented*
# training images (the training transform, teacher in eval mode), each feature and each mean rounded to 4 decimals;
# or CLASS_MEANS_AUGMENT False / CLASS_MEANS_DECIMALS -1 for the un-augmented, unrounded means.
_cfg.CLASS_MEANS_AUGMENT = True
_cfg.CLASS_MEANS_DECIMALS = 4  # -1 = no rounding
_cfg.NORM_MARGIN = 0.0  # m of appendix B.4: the teacher norm in the max is scaled by (1 + m)
# False: the plain batch mean of the authors' code (all their datasets are balanced or nearly so); True: eq. 7's
# per-class average as the paper writes it (sample weights N / (C |I_k|)), equal to it on a balanced training set.
_cfg.CLASS_BALANCED = False

PROJECTORS = ("bn_dropout_linear", "linear_bn", "linear")
LINEAR_INITS = ("default", "zero_bias", "normal")
PROJECTOR_DROPOUT = 0.5


def dino_loss(feat_student, feat_teacher, class_means, labels, weight=None, norm_margin=0.0):
    """mean_i w_i (1 - f_s,i . e_{y_i} / max(|f_s,i|, (1 + m) |f_t,i|)), e_k the unit class mean (0 if c_k = 0)."""
    e = F.normalize(class_means[labels], dim=1)
    s_norm = feat_student.norm(dim=1)
    t_norm = feat_teacher.detach().norm(dim=1) * (1.0 + norm_margin)
    denom = torch.maximum(s_norm, t_norm).clamp_min(1e-12)
    per_sample = 1.0 - (feat_student * e).sum(1) / denom
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def class_weights(counts):
    """N / (C' |I_k|) per class (C' classes with images); 1 for classes without images (never sampled)."""
    counts = counts.double()
    present = counts > 0
    if not present.any():
        return torch.ones_like(counts, dtype=torch.float32)
    w = counts.sum() / (present.sum() * counts.clamp_min(1))
    return torch.where(present, w, torch.ones_like(w)).float()


def build_projector(dim_student, dim_teacher, kind):
    """The student-to-teacher feature projector (identity when the sizes agree); BatchNorm1d weight 1, bias 0."""
    if dim_student == dim_teacher:
        return nn.Identity()
    if kind == "bn_dropout_linear":
        layers = [nn.BatchNorm1d(dim_student), nn.Dropout(PROJECTOR_DROPOUT), nn.Linear(dim_student, dim_teacher)]
    else:
        layers = [nn.Linear(dim_student, dim_teacher)]
        if kind == "linear_bn":
            layers.append(nn.BatchNorm1d(dim_teacher))
    for m in layers:
        if isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def init_linears(modules, kind):
    """Re-initialise every nn.Linear in `modules` as the authors' student wrapper does (see DINO.LINEAR_INIT)."""
    if kind == "default":
        return
    for module in modules:
        for m in module.modules():
            if not isinstance(m, nn.Linear):
                continue
            if kind == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                if kind == "normal":
                    nn.init.normal_(m.bias, 0.0, 0.01)
                else:
                    nn.init.zeros_(m.bias)


@TERM_REGISTRY.register("dino", config=_cfg, section="DINO")
class DinoTerm(nn.Module):
    """DINO.WEIGHT * dino, a distillation term added to any teacher-based method; see the module docstring."""

    def __init__(self, *, student_dim, teacher_dim, num_classes, weight=2.0, projector="bn_dropout_linear",
                 norm_margin=0.0, class_balanced=False):
        super().__init__()
        self.weight, self.norm_margin, self.class_balanced = weight, norm_margin, class_balanced
        self.projector = build_projector(student_dim, teacher_dim, projector)
        self.register_buffer("class_means", torch.zeros(num_classes, teacher_dim))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self._ready_checked = False

    @classmethod
    def from_config(cls, cfg):
        """The keyword arguments DINO gives (the sizes come from the models: `build`)."""
        d = cfg.DINO
        return {"weight": d.WEIGHT, "projector": d.PROJECTOR, "norm_margin": d.NORM_MARGIN,
                "class_balanced": d.CLASS_BALANCED}

    @classmethod
    def build(cls, cfg, student, teacher, num_classes):
        """The term for this student/teacher pair; re-initialises the student's Linear layers as DINO.LINEAR_INIT
        says (the authors' student wrapper does it when it adds the projector)."""
        term = cls(student_dim=student.feat_dim, teacher_dim=teacher.feat_dim, num_classes=num_classes,
                   **cls.from_config(cfg))
        init_linears((student, term.projector), cfg.DINO.LINEAR_INIT)
        return term

    @staticmethod
    def validate_config(cfg):
        d = cfg.DINO
        if d.WEIGHT < 0:
            raise ConfigError(f"config key DINO.WEIGHT: must be >= 0, got {d.WEIGHT}")
        if d.PROJECTOR not in PROJECTORS:
            raise ConfigError(f"config key DINO.PROJECTOR: must be one of {', '.join(PROJECTORS)}, got "
                              f"'{d.PROJECTOR}'")
        if d.LINEAR_INIT not in LINEAR_INITS:
            raise ConfigError(f"config key DINO.LINEAR_INIT: must be one of {', '.join(LINEAR_INITS)}, got "
                              f"'{d.LINEAR_INIT}'")
        if d.CLASS_MEANS_DECIMALS < -1:
            raise ConfigError(f"config key DINO.CLASS_MEANS_DECIMALS: must be >= 0 decimals, or -1 for no rounding, "
                              f"got {d.CLASS_MEANS_DECIMALS}")
        if d.NORM_MARGIN <= -1:
            raise ConfigError(f"config key DINO.NORM_MARGIN: must be > -1 (teacher norm x (1 + m)), got "
                              f"{d.NORM_MARGIN}")

    def set_class_means(self, means, counts):
        """Install teacher class means (C, D) and per-class image counts (C,)."""
        if tuple(means.shape) != tuple(self.class_means.shape):
            raise ValueError(f"class means of shape {tuple(means.shape)} do not fit this term "
                             f"({tuple(self.class_means.shape)}: classes x teacher feature size)")
        self.class_means.copy_(means)
        self.class_weights.copy_(class_weights(counts.to(self.class_weights.device)))
        self.ready.fill_(True)

    def forward(self, out, images, labels, teacher):
        """The term for one step, from X's StepOutput `out` (its teacher fields are filled here if X never ran
        the teacher)."""
        if out.student_features is None:
            raise RuntimeError("the method's forward_train returned no student features (return a StepOutput with "
                               "student_features), so the dino term has none")
        if out.teacher_features is None:
            out.teacher_logits, out.teacher_features = teacher(images)
        if not self._ready_checked:  # once: reading the flag is a device sync, not for every step
            self._ready_checked = True
            if not bool(self.ready):
                warnings.warn("the dino term's teacher class means were never set (set_class_means not called); "
                              "the term is constant until they are")
        feat_s = self.projector(out.student_features["pooled_feat"])
        weight = self.class_weights[labels] if self.class_balanced else None
        loss = dino_loss(feat_s, out.teacher_features["pooled_feat"], self.class_means, labels, weight,
                         self.norm_margin)
        return distill_loss(self.weight * loss)
