"""The "++" of KD++ (Wang et al., "Improving Knowledge Distillation via Regularizing Feature Direction and
Norm"): the dino term, added to any teacher-based method X as DISTILLER.TYPE "X++".

The term pulls the student's penultimate feature f_s towards the direction of the teacher's class mean e_k, with a
norm at least the teacher's: 1 - f_s.e_k / max(|f_s|, |f_t|) (eq. 5-7), weighted by DINO.WEIGHT (beta of eq. 8)
beside X's own losses. The builder adds a `DinoTerm` to X (`Distiller.add_term`) and the term reads the features of
X's own forward from its StepOutput, so X needs no edit and nothing runs twice. The class means are handed to
the term before the first step (`set_class_means`: the builder's cached teacher pass, engine/class_means.py) and live
in buffers, so checkpoints carry them. Projector,
Linear re-initialisation and the equations in full: docs/methods.md, "The ++ variants".

The paper's ablations are switches of this term (docs/methods.md, "KD++ ablations"): DINO.FORM replaces the dino
loss by the baselines of section 3.2 or their sums (cosine or InfoNCE direction, eq. 1-2; L2 to the teacher feature
or SIFN norm growth, eq. 3-4; L2 to the class centre, table 5), each logged under its own name, and DINO.CENTRES
takes the teacher's classifier weights as the class centres instead of its class-mean features (table 5).
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
# The loss, as "+"-joined parts, each a logged term weighted by DINO.WEIGHT (or FORM_WEIGHTS): dino (eq. 7, KD++),
# cosine (eq. 1), infonce (eq. 2), l2 (eq. 3: |f_s - f_t|^2), sifn (eq. 4: the norm grown by SIFN_STEP per step, as
# AFN's code: (|f_s| - sg(|f_s|) - r)^2), l2_centre (|f_s - c_y|^2: with CENTRES classifier_weights table 5's "L2
# of cls weights"). Every part reads the projected student feature. The paper's table 4 rows: docs/methods.md.
_cfg.FORM = "dino"
_cfg.FORM_WEIGHTS = []  # one weight per part of FORM; empty = DINO.WEIGHT for every part
_cfg.SIFN_STEP = 1.0  # r of eq. 4 (AFN's delta r)
# The class centres c_k: class_means (the teacher's class-mean features, the paper) or classifier_weights (the rows of
# the teacher's classifier, table 5's "w/ weights").
_cfg.CENTRES = "class_means"
# False: the plain batch mean of the authors' code (all their datasets are balanced or nearly so); True: eq. 7's
# per-class average as the paper writes it (sample weights N / (C |I_k|)), equal to it on a balanced training set.
_cfg.CLASS_BALANCED = False

PROJECTORS = ("bn_dropout_linear", "linear_bn", "linear")
FORM_PARTS = ("dino", "cosine", "infonce", "l2", "sifn", "l2_centre")
CENTRED_PARTS = ("dino", "cosine", "infonce", "l2_centre")  # the parts that read the class centres
CENTRES = ("class_means", "classifier_weights")
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


def _weighted_mean(per_sample, weight):
    return (per_sample * weight).mean() if weight is not None else per_sample.mean()


def cosine_direction_loss(feat_student, centres, labels, weight=None):
    """eq. 1: mean_i w_i (1 - cos(f_s,i, c_{y_i}))."""
    return _weighted_mean(1.0 - F.cosine_similarity(feat_student, centres[labels], dim=1), weight)


def infonce_direction_loss(feat_student, centres, labels, weight=None):
    """eq. 2: mean_i w_i (-log softmax_j cos(f_s,i, c_j) at j = y_i); a centre of norm 0 has cosine 0."""
    cos = F.normalize(feat_student, dim=1) @ F.normalize(centres, dim=1).t()
    return _weighted_mean(F.cross_entropy(cos, labels, reduction="none"), weight)


def l2_loss(feat_student, target, weight=None):
    """eq. 3 (target f_t) or table 5's L2 to the class centre: mean_i w_i |f_s,i - target_i|^2."""
    return _weighted_mean((feat_student - target).pow(2).sum(1), weight)


def sifn_loss(feat_student, step, weight=None):
    """eq. 4 as AFN's code (Xu et al. 2019) computes it: mean_i w_i (|f_s,i| - (sg(|f_s,i|) + r))^2, so each
    step pulls every norm towards r more than its present value (the value is r^2; the gradient is what acts)."""
    norm = feat_student.norm(dim=1)
    return _weighted_mean((norm - (norm.detach() + step)).pow(2), weight)


def classifier_weight(model, feat_dim, num_classes):
    """The rows of `model`'s classifier (its last Linear from feat_dim to num_classes): table 5's centres."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == feat_dim
             and m.out_features == num_classes]
    if not found:
        raise ConfigError(f"config key DINO.CENTRES classifier_weights: the teacher has no Linear layer from its "
                          f"feature size {feat_dim} to the {num_classes} classes; use DINO.CENTRES class_means")
    return found[-1].weight.detach()


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
                 norm_margin=0.0, class_balanced=False, form="dino", form_weights=(), sifn_step=1.0):
        super().__init__()
        self.weight, self.norm_margin, self.class_balanced = weight, norm_margin, class_balanced
        self.parts = tuple(form.split("+"))
        self.part_weights = tuple(form_weights) or (weight,) * len(self.parts)
        self.sifn_step = sifn_step
        self.projector = build_projector(student_dim, teacher_dim, projector)
        # the class centres (the teacher's class means, or its classifier rows: set_class_means / set_centres)
        self.register_buffer("class_means", torch.zeros(num_classes, teacher_dim))
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.register_buffer("ready", torch.tensor(not self.uses_centres))
        self._ready_checked = False

    @property
    def uses_centres(self):
        return any(p in CENTRED_PARTS for p in self.parts)

    @classmethod
    def from_config(cls, cfg):
        """The keyword arguments DINO gives (the sizes come from the models: `build`)."""
        d = cfg.DINO
        return {"weight": d.WEIGHT, "projector": d.PROJECTOR, "norm_margin": d.NORM_MARGIN,
                "class_balanced": d.CLASS_BALANCED, "form": d.FORM, "form_weights": tuple(d.FORM_WEIGHTS),
                "sifn_step": d.SIFN_STEP}

    @staticmethod
    def needs_class_means(cfg):
        """Whether the run needs the teacher's pass over the training set for its class means."""
        d = cfg.DINO
        return d.CENTRES == "class_means" and any(p in CENTRED_PARTS for p in d.FORM.split("+"))

    @classmethod
    def build(cls, cfg, student, teacher, num_classes):
        """The term for this student/teacher pair; re-initialises the student's Linear layers as DINO.LINEAR_INIT
        says (the authors' student wrapper does it when it adds the projector). With DINO.CENTRES
        classifier_weights the centres are the teacher's classifier rows, installed here."""
        term = cls(student_dim=student.feat_dim, teacher_dim=teacher.feat_dim, num_classes=num_classes,
                   **cls.from_config(cfg))
        init_linears((student, term.projector), cfg.DINO.LINEAR_INIT)
        if cfg.DINO.CENTRES == "classifier_weights":
            term.set_centres(classifier_weight(teacher, teacher.feat_dim, num_classes))
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
        parts = d.FORM.split("+")
        bad = [p for p in parts if p not in FORM_PARTS]
        if bad or len(set(parts)) != len(parts):
            raise ConfigError(f"config key DINO.FORM: parts joined by '+', each once, from {', '.join(FORM_PARTS)}; "
                              f"got '{d.FORM}'")
        if d.FORM_WEIGHTS and (len(d.FORM_WEIGHTS) != len(parts) or min(d.FORM_WEIGHTS) < 0):
            raise ConfigError(f"config key DINO.FORM_WEIGHTS: one weight >= 0 per part of DINO.FORM '{d.FORM}' "
                              f"({len(parts)}), or [] for DINO.WEIGHT each; got {list(d.FORM_WEIGHTS)}")
        if d.CENTRES not in CENTRES:
            raise ConfigError(f"config key DINO.CENTRES: must be one of {', '.join(CENTRES)}, got '{d.CENTRES}'")
        if d.CLASS_BALANCED and not DinoTerm.needs_class_means(cfg):
            raise ConfigError("config key DINO.CLASS_BALANCED: the class counts it weights by come with the teacher "
                              "class means, which this DINO.FORM / DINO.CENTRES does not compute; set "
                              "DINO.CLASS_BALANCED False")
        if d.SIFN_STEP < 0:
            raise ConfigError(f"config key DINO.SIFN_STEP: must be >= 0, got {d.SIFN_STEP}")

    def set_class_means(self, means, counts):
        """Install teacher class means (C, D) and per-class image counts (C,)."""
        self.set_centres(means)
        self.class_weights.copy_(class_weights(counts.to(self.class_weights.device)))

    def set_centres(self, centres):
        """Install class centres (C, D): the class means, or the teacher's classifier rows."""
        if tuple(centres.shape) != tuple(self.class_means.shape):
            raise ValueError(f"class centres of shape {tuple(centres.shape)} do not fit this term "
                             f"({tuple(self.class_means.shape)}: classes x teacher feature size)")
        self.class_means.copy_(centres)
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
        if self.parts == ("dino",):  # KD++ itself: one term, logged as "dino"
            return distill_loss(self.weight * self._part("dino", feat_s, out, labels, weight))
        return {part: distill_loss(w * self._part(part, feat_s, out, labels, weight))
                for part, w in zip(self.parts, self.part_weights)}

    def _part(self, part, feat_s, out, labels, weight):
        feat_t, centres = out.teacher_features["pooled_feat"].detach(), self.class_means
        if part == "dino":
            return dino_loss(feat_s, feat_t, centres, labels, weight, self.norm_margin)
        if part == "cosine":
            return cosine_direction_loss(feat_s, centres, labels, weight)
        if part == "infonce":
            return infonce_direction_loss(feat_s, centres, labels, weight)
        if part == "l2":
            return l2_loss(feat_s, feat_t, weight)
        if part == "sifn":
            return sifn_loss(feat_s, self.sifn_step, weight)
        return l2_loss(feat_s, centres[labels], weight)  # l2_centre
